"""Wall and CPU time of whole experiments, XLA's stock path against ours, in one run.

Each experiment's `runlocal` config (the smallest real run: real data, real models)
runs through the CLI twice, in alternating order over repeats:
  stock  `JAXPOISON_STOCK_CONVOLUTIONS=1 --cpu_devices=1`: XLA's own convolutions
         and gradients on one CPU device (the state before issue 14)
  ours   the defaults: `models/conv.py`'s CPU kernels, one CPU device per core
  processes  ours as `--processes N`, N = the cores: one pinned single-device JAX
         process per core, joined by jax.distributed (only with `--variants`)
  cached ours with JAX's compilation cache warm (`--compilation_cache=DIR`, a
         folder of this benchmark run that one untimed run of the experiment
         fills first): a rerun or a resumed run (only with `--variants`)
The other variants run with no compilation cache (`--compilation_cache=`), so
they compile everything, as the CLI did before it kept a cache and as a first run
does. Every run gets a fresh workdir, so nothing is resumed. Reported per experiment:
median wall seconds, median CPU seconds (user + system of the run's process tree),
and for stock / ours (ours' speed-up), ours / processes and ours / cached (their
speed-ups); "same rows" says whether every finished run wrote the same results
(`results.jsonl` without timings, bit for bit). Compilation is included: it is
part of what a user waits for. On a shared machine CPU seconds are the steadier
figure.

Usage:
  python benchmarks/experiment_times.py                      # every experiment below
  python benchmarks/experiment_times.py --experiments metapoison shielding --repeats 2
  python benchmarks/experiment_times.py --timeout 600   # stop any run at 10 min
  python benchmarks/experiment_times.py --variants ours  # re-time one side only
  python benchmarks/experiment_times.py --variants ours processes --repeats 2
  python benchmarks/experiment_times.py --variants ours cached --repeats 2
Needs ../shared/data prepared as README's "Getting the data" says (cifar10 in the
tfds dir; road signs read from `--manual_dir`).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
EXPERIMENTS = {  # name: extra CLI flags for its runlocal config
    "quickstart": [],
    "frogs_oneshot": [],
    "frogs_e2e": [],
    "backdoor_grid": [],
    "badnets_roadsigns": ["--config.manual_dir={manual_dir}"],
    "roadsigns_cleanlabel": ["--config.manual_dir={manual_dir}"],
    "metapoison": [],
    "shielding": [],
    "gradient_matching": [],
    "defences": [],
}
NO_CACHE = "--compilation_cache="
VARIANTS = {
    "stock": ({"JAXPOISON_STOCK_CONVOLUTIONS": "1"}, ["--cpu_devices=1", NO_CACHE]),
    "ours": ({}, [NO_CACHE]),
    "processes": ({}, [f"--processes={len(os.sched_getaffinity(0))}", NO_CACHE]),
    "cached": ({}, ["--compilation_cache={cache_dir}"]),
}
DEFAULT_VARIANTS = ["stock", "ours"]
# (slower, faster) pairs whose time ratio slower / faster is reported.
SPEEDUPS = (("stock", "ours"), ("ours", "processes"), ("ours", "cached"))


def run_once(name: str, variant: str, args) -> dict:
    """One CLI run in a fresh workdir; wall and CPU seconds of its process tree."""
    env_extra, flags = VARIANTS[variant]
    flags = [f.format(cache_dir=args.cache_dir) for f in flags]
    extra = [f.format(manual_dir=args.manual_dir) for f in EXPERIMENTS[name]]
    with tempfile.TemporaryDirectory(prefix=f"times-{name}-") as workdir:
        command = [
            sys.executable,
            "-m",
            "jaxpoison",
            f"--config={ROOT}/configs/{name}.py:runlocal",
            f"--workdir={workdir}/run",
            f"--data_dir={args.data_dir}",
            *extra,
            *flags,
        ]
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        start = time.perf_counter()
        timed_out = False
        try:
            done = subprocess.run(
                command,
                env={**os.environ, **env_extra},
                capture_output=True,
                text=True,
                timeout=args.timeout,
            )
        except subprocess.TimeoutExpired:
            # Killed and reaped unfinished: its times are lower bounds.
            timed_out = True
        wall = time.perf_counter() - start
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        if not timed_out and done.returncode != 0:
            tail = done.stderr.strip().splitlines()[-1:] or ["(no stderr)"]
            raise SystemExit(f"{name} ({variant}) failed: {tail[0]}")
        digest = None if timed_out else results_digest(Path(workdir) / "run")
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return {
        "experiment": name,
        "variant": variant,
        "wall_s": wall,
        "cpu_s": cpu,
        "timed_out": timed_out,
        "results_digest": digest,
    }


def results_digest(workdir: Path) -> str:
    """SHA-256 of the run's rows without their timings: equal digests mean two
    variants computed the same results (to the last bit)."""
    lines = (workdir / "results.jsonl").read_text().splitlines()
    rows = [json.loads(x) for x in lines if x.strip()]
    for row in rows:
        row.pop("seconds", None)
    return hashlib.sha256(json.dumps(rows, sort_keys=True).encode()).hexdigest()[:16]


def summarise(rows: list[dict]) -> list[dict]:
    """Medians per experiment and variant, and the `SPEEDUPS` ratios (None unless
    both of a pair ran)."""
    table = []
    for name in dict.fromkeys(r["experiment"] for r in rows):
        mine = [r for r in rows if r["experiment"] == name]
        ran = list(dict.fromkeys(r["variant"] for r in mine))
        med = {
            (v, k): statistics.median(r[k] for r in mine if r["variant"] == v)
            for v in ran
            for k in ("wall_s", "cpu_s")
        }
        # a variant with a run stopped at --timeout: its times are floors
        cut = {v: any(r["timed_out"] for r in mine if r["variant"] == v) for v in ran}
        table.append(
            {
                "experiment": name,
                **{f"{v}_{k}": round(med[v, k], 1) for v, k in med},
                **{
                    f"{k}_{ratio_name(slow, fast)}": (
                        round(med[slow, f"{k}_s"] / med[fast, f"{k}_s"], 2)
                        if {slow, fast} <= set(ran)
                        else None
                    )
                    for slow, fast in SPEEDUPS
                    for k in ("wall", "cpu")
                },
                **{f"{v}_timed_out": cut[v] for v in ran},
                # one digest when every finished run computed the same rows
                "same_results": len(
                    {r["results_digest"] for r in mine if not r["timed_out"]}
                )
                <= 1,
            }
        )
    return table


def ratio_name(slow: str, fast: str) -> str:
    """The key of slow / fast: `ratio` for stock / ours (the older files' name)."""
    return "ratio" if (slow, fast) == SPEEDUPS[0] else f"{slow}_over_{fast}"


def cell(t: dict, variant: str, key: str) -> str:
    """A table cell: the median seconds, '>= ' when stopped, '-' when not run."""
    if f"{variant}_{key}" not in t:
        return "-"
    return f"{'>= ' if t[f'{variant}_timed_out'] else ''}{t[f'{variant}_{key}']}"


def ratio_cell(t: dict, key: str, slow: str, fast: str) -> str:
    """slow / fast: a floor when only slow was stopped, '?' when fast was."""
    ratio = t[f"{key}_{ratio_name(slow, fast)}"]
    if ratio is None:
        return "-"
    if t[f"{fast}_timed_out"]:
        return "?"
    return f"{'>= ' if t[f'{slow}_timed_out'] else ''}{ratio}x"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--experiments", nargs="+", default=list(EXPERIMENTS))
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument(
        "--data_dir", default=os.path.expanduser("~/.cache/jaxpoison/tfds")
    )
    parser.add_argument(
        "--manual_dir", default=str(ROOT.parent / "shared" / "data" / "roadsigns")
    )
    parser.add_argument("--out", default=None, help="also write the rows as JSON")
    parser.add_argument(
        "--timeout",
        type=float,
        default=None,
        help="stop a run after this many seconds; its times are then lower bounds "
        "(printed as '>= t'), and so is the ratio if only the stock run was stopped",
    )
    parser.add_argument(
        "--variants", nargs="+", choices=list(VARIANTS), default=DEFAULT_VARIANTS
    )
    args = parser.parse_args()
    unknown = sorted(set(args.experiments) - set(EXPERIMENTS))
    if unknown:
        raise SystemExit(f"unknown experiment(s): {', '.join(unknown)}")
    rows, warm = [], set()
    with tempfile.TemporaryDirectory(prefix="times-cache-") as args.cache_dir:
        for repeat in range(args.repeats):
            for name in args.experiments:
                order = args.variants if repeat % 2 == 0 else args.variants[::-1]
                for variant in order:
                    if variant == "cached" and name not in warm:
                        run_once(name, variant, args)  # fills the cache, untimed
                        warm.add(name)
                    rows.append(run_once(name, variant, args))
                    print(json.dumps(rows[-1]), flush=True)
    table = summarise(rows)
    ran = [v for v in VARIANTS if v in args.variants]
    pairs = [p for p in SPEEDUPS if set(p) <= set(ran)]
    header = ["experiment (runlocal)"]
    for key in ("wall", "CPU"):
        header += [f"{v} {key} s" for v in ran]
        header += [f"{key} {slow} / {fast}" for slow, fast in pairs]
    header.append("same rows")
    print("\n| " + " | ".join(header) + " |\n|" + "---|" * len(header))
    for t in table:
        cells = [t["experiment"]]
        for key in ("wall", "cpu"):
            cells += [cell(t, v, f"{key}_s") for v in ran]
            cells += [ratio_cell(t, key, slow, fast) for slow, fast in pairs]
        cells.append("yes" if t["same_results"] else "no")
        print("| " + " | ".join(cells) + " |")
    if args.out:
        Path(args.out).write_text(json.dumps({"runs": rows, "table": table}, indent=1))


if __name__ == "__main__":
    main()
