"""Sweeps survive a SIGKILL: orbax commits each chunk, a rerun resumes after it.

The kill test runs the sweep in a fresh Python with 8 fake CPU devices (the trial
axis sharded over them), kills it with SIGKILL once the k-th chunk's checkpoint has
appeared, reruns the same command, and compares with an uninterrupted run and with
the same trials run unsharded in a loop, one at a time.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import orbax.checkpoint as ocp

from jaxpoison.sweep import run_chunks
from jaxpoison.sweep.chunks import checkpoint_manager, empty_state

REPO = Path(__file__).resolve().parents[1]

# A real jitted, vmapped trial: a few gradient steps of least squares on data drawn
# from the trial's seed. Each computed chunk appends its first trial id to a log.
SWEEP_SCRIPT = """
    import json
    import sys
    import time

    import jax
    import jax.numpy as jnp
    import numpy as np

    from jaxpoison.sweep import run_chunks
    from jaxpoison.sweep.sharding import to_host, trial_mesh

    workdir, log, mode = sys.argv[1], sys.argv[2], sys.argv[3]

    def trial(seed):
        kx, kw = jax.random.split(jax.random.key(seed))
        x = jax.random.normal(kx, (16, 4))
        y = x @ jax.random.normal(kw, (4,))
        loss = lambda w: jnp.mean((x @ w - y) ** 2)
        w = jnp.zeros(4)
        for _ in range(5):
            w = w - 0.1 * jax.grad(loss)(w)
        return loss(w), w[0]

    if mode == "loop":  # one trial at a time, no vmap, no mesh: the reference
        for s in range(22):
            loss, w0 = trial(s)
            print(json.dumps({"id": s, "loss": float(loss), "w0": float(w0)}))
        sys.exit(0)

    batched = jax.jit(jax.vmap(trial))

    def trial_rows(chunk):
        ids, (loss, w0) = to_host((chunk["id"], batched(chunk["id"])))
        time.sleep(0.4)  # a chunk long enough to be killed in
        with open(log, "a") as f:
            f.write(f"{int(ids[0])}\\n")
        return [
            {"id": int(i), "loss": float(a), "w0": float(b)}
            for i, a, b in zip(ids, loss, w0)
        ]

    assert jax.device_count() == 8
    specs = {"id": np.arange(22, dtype=np.int32)}
    run_chunks(trial_rows, specs, 4, workdir, mesh=trial_mesh())
    print("sweep finished")
"""


def _env() -> dict[str, str]:
    env = dict(os.environ)
    flags = env.get("XLA_FLAGS", "")
    env["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count=8"
    env["JAX_PLATFORMS"] = "cpu"
    paths = [str(REPO), env.get("PYTHONPATH", "")]
    env["PYTHONPATH"] = os.pathsep.join(p for p in paths if p)
    return env


def _sweep(workdir: Path, log: Path, mode: str = "sweep") -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(SWEEP_SCRIPT), str(workdir), str(log)]
        + [mode],
        cwd=REPO,
        env=_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _finish(proc: subprocess.Popen) -> str:
    out, err = proc.communicate(timeout=240)
    assert proc.returncode == 0, out + err[-4000:]
    return out


def _rows(workdir: Path) -> list[dict]:
    lines = (workdir / "results.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines]


def _committed_steps(workdir: Path) -> list[int]:
    names = os.listdir(workdir / "checkpoints")
    return sorted(int(n) for n in names if n.isdigit())


def _logged_chunks(log: Path) -> list[int]:
    return [int(x) // 4 for x in log.read_text().split()] if log.exists() else []


def test_sigkilled_sweep_resumes_without_losing_or_repeating_trials(tmp_path):
    reference = _sweep(tmp_path / "ref", tmp_path / "ref.log", "loop")
    uninterrupted = _sweep(tmp_path / "whole", tmp_path / "whole.log")
    killed = _sweep(tmp_path / "killed", tmp_path / "first.log")
    k = 2  # kill once chunk k-1 (the k-th chunk) is committed
    deadline = time.monotonic() + 240
    while not (tmp_path / "killed" / "checkpoints" / str(k)).is_dir():
        assert killed.poll() is None, killed.communicate()[1][-4000:]
        assert time.monotonic() < deadline, "no checkpoint appeared"
        time.sleep(0.02)
    killed.send_signal(signal.SIGKILL)
    killed.communicate(timeout=60)
    assert killed.returncode == -signal.SIGKILL
    assert not (tmp_path / "killed" / "results.jsonl").exists()  # killed mid-sweep
    committed = _committed_steps(tmp_path / "killed")[-1]
    assert k <= committed < 6
    first = _logged_chunks(tmp_path / "first.log")

    assert "sweep finished" in _finish(_sweep(tmp_path / "killed", tmp_path / "2.log"))
    second = _logged_chunks(tmp_path / "2.log")
    assert first[:committed] == list(range(committed))
    assert second == list(range(committed, 6))  # no committed chunk is redone
    rows = _rows(tmp_path / "killed")
    assert [r["id"] for r in rows] == list(range(22))  # none lost, none repeated
    _finish(uninterrupted)
    assert rows == _rows(tmp_path / "whole")
    ref = [json.loads(line) for line in _finish(reference).splitlines()]
    np.testing.assert_allclose(
        [(r["loss"], r["w0"]) for r in rows],
        [(r["loss"], r["w0"]) for r in ref],
        rtol=1e-5,
        atol=1e-7,
    )


# --- in this process: what a checkpoint commits ------------------------------------


def _square_rows(seen):
    def trial_rows(chunk):
        seen.append([int(i) for i in chunk["id"]])
        return [{"id": int(i), "square": int(i) ** 2} for i in chunk["id"]]

    return trial_rows


def test_checkpoint_holds_chunk_count_and_file_digests(tmp_path):
    run_chunks(_square_rows([]), {"id": np.arange(7)}, 3, str(tmp_path))
    manager = checkpoint_manager(str(tmp_path))
    assert manager.latest_step() == 3
    state = manager.restore(3, args=ocp.args.StandardRestore(empty_state(3)))
    assert int(state["chunks_done"]) == 3
    for i in range(3):
        data = (tmp_path / "chunks" / f"{i:05d}.jsonl").read_bytes()
        expected = np.frombuffer(hashlib.sha256(data).digest(), np.uint8)
        np.testing.assert_array_equal(state["digests"][i], expected)
    manager.close()


def test_chunk_written_but_not_committed_is_recomputed(tmp_path):
    rows = run_chunks(_square_rows([]), {"id": np.arange(7)}, 3, str(tmp_path))
    # As if killed between writing chunk 2's rows and committing its checkpoint.
    shutil.rmtree(tmp_path / "checkpoints" / "3")
    (tmp_path / "chunks" / "00002.jsonl").write_text('{"id": 6, "square": -1}\n')
    seen = []
    again = run_chunks(_square_rows(seen), {"id": np.arange(7)}, 3, str(tmp_path))
    assert seen == [[6]]
    assert again == rows


def test_committed_chunk_that_changed_is_recomputed(tmp_path):
    rows = run_chunks(_square_rows([]), {"id": np.arange(7)}, 3, str(tmp_path))
    (tmp_path / "chunks" / "00001.jsonl").write_text('{"id": 3, "square": 0}\n')
    seen = []
    again = run_chunks(_square_rows(seen), {"id": np.arange(7)}, 3, str(tmp_path))
    assert seen == [[3, 4, 5], [6]]  # from the first bad chunk on
    assert again == rows
    assert _committed_steps(tmp_path)[-1] == 3
