"""The colab/ notebooks run top to bottom at their smallest size.

Each notebook reads JAXPOISON_NOTEBOOK_SMALL=1 in its first cells and shrinks every
size; nbclient executes it in a fresh kernel from the colab/ folder, on CPU. The
committed notebooks carry no outputs (nbstripout style); that is checked too.

Which jaxpoison the kernel imports: with JAXPOISON_WHEEL_PYTHON set to the python
of an environment where the built wheel is installed (CI: `.ci/run` sets it), the
kernel runs that python, with nothing of this checkout on its path, as a Colab user's
would after the install cell; unset, this checkout (a developer's run).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")

REPO = Path(__file__).resolve().parents[1]
COLAB = REPO / "colab"
NOTEBOOKS = sorted(p.name for p in COLAB.glob("*.ipynb"))
WHEEL_PYTHON = os.environ.get("JAXPOISON_WHEEL_PYTHON", "")
WHERE = "jaxpoison imported from: "


def _wheel_kernel(tmp_path: Path, monkeypatch) -> str:
    """A kernelspec running WHEEL_PYTHON (it needs ipykernel); returns its name."""
    spec = tmp_path / "jupyter" / "kernels" / "jaxpoison-wheel"
    spec.mkdir(parents=True)
    argv = [WHEEL_PYTHON, "-m", "ipykernel_launcher", "-f", "{connection_file}"]
    kernel = {"argv": argv, "display_name": "jaxpoison wheel", "language": "python"}
    (spec / "kernel.json").write_text(json.dumps(kernel))
    monkeypatch.setenv("JUPYTER_PATH", str(tmp_path / "jupyter"))
    monkeypatch.delenv("PYTHONPATH", raising=False)
    return "jaxpoison-wheel"


def _execute(name: str, workdir: Path, monkeypatch):
    nb = nbformat.read(COLAB / name, as_version=4)
    # Says which jaxpoison ran (the install cell is skipped when one is importable).
    nb.cells.append(
        nbformat.v4.new_code_cell(
            f"import jaxpoison\nprint({WHERE!r} + jaxpoison.__file__)"
        )
    )
    if WHEEL_PYTHON:
        kernel_name = _wheel_kernel(workdir, monkeypatch)
    else:
        # The kernel inherits this environment: it imports this checkout.
        kernel_name = "python3"
        path = os.pathsep.join(
            p for p in [str(REPO), os.environ.get("PYTHONPATH")] if p
        )
        monkeypatch.setenv("PYTHONPATH", path)
    client = nbclient.NotebookClient(
        nb,
        timeout=300,
        kernel_name=kernel_name,
        resources={"metadata": {"path": str(COLAB)}},
    )
    monkeypatch.setenv("JAXPOISON_NOTEBOOK_SMALL", "1")
    monkeypatch.setenv("JAXPOISON_NOTEBOOK_WORKDIR", str(workdir))
    monkeypatch.setenv("JAX_PLATFORMS", "cpu")
    client.execute()
    return nb


def _text(nb) -> str:
    parts = []
    for cell in nb.cells:
        for out in cell.get("outputs", []):
            parts.append(out.get("text", ""))
            parts.append(out.get("data", {}).get("text/plain", ""))
            parts.append(out.get("data", {}).get("text/markdown", ""))
    return "\n".join(parts)


def test_there_are_the_four_notebooks():
    assert set(NOTEBOOKS) >= {
        "quickstart.ipynb",
        "frogs_oneshot.ipynb",
        "backdoor_triggers.ipynb",
        "metalearner_toy.ipynb",
    }


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_committed_without_outputs(name):
    nb = nbformat.read(COLAB / name, as_version=4)
    nbformat.validate(nb)
    for cell in nb.cells:
        if cell.cell_type == "code":
            assert cell.outputs == [] and cell.execution_count is None, name


# What each notebook must print when it ran: the numbers it computed.
EXPECT = {
    "quickstart.ipynb": ["n_poisons=16: success", "| n_poisons | trials |"],
    "frogs_oneshot.ipynb": ["poisoned victims:", "clean victims:"],
    "backdoor_triggers.ipynb": ["attack success"],
    "metalearner_toy.ipynb": ["meta-loss", "target classified as"],
}


# Notebooks too slow for the default run even at their smallest size go here
# (`pytest -m slow` runs them). On the AVX2 CI machine of 2026-12-02 the four took
# 130 s together (backdoor_triggers 58 s, mostly XLA compiles), over the 90 s asked
# for; the other three took 72 s.
SLOW: set[str] = {"backdoor_triggers.ipynb"}
# Out of the default run, into CI's `-m 'experiment or heavy'` run: on the Intel CI
# machine of 2026-12-03 the default run took 961 s with these two in it (50 s and
# 43 s), over the 15 minutes asked for. metalearner_toy stays in the default run.
HEAVY: set[str] = {"quickstart.ipynb", "frogs_oneshot.ipynb"}


def notebook_param(name: str):
    """`name` as a parameter, marked `slow` or `heavy` where it is one."""
    if name in SLOW:
        return pytest.param(name, marks=pytest.mark.slow)
    if name in HEAVY:
        return pytest.param(name, marks=pytest.mark.heavy)
    return name


@pytest.mark.parametrize("name", [notebook_param(n) for n in NOTEBOOKS])
def test_notebook_runs_at_its_smallest_size(name, tmp_path, monkeypatch):
    text = _text(_execute(name, tmp_path, monkeypatch))
    assert "pip" not in text.lower(), "the install cell ran"
    where = next(x for x in text.splitlines() if x.startswith(WHERE))
    source = Path(where.removeprefix(WHERE)).resolve()
    if WHEEL_PYTHON:  # the installed wheel, not this checkout
        assert REPO not in source.parents, where
        assert Path(WHEEL_PYTHON).parent.parent.resolve() in source.parents, where
    else:
        assert source == REPO / "jaxpoison" / "__init__.py", where
    for expected in EXPECT.get(name, []):
        assert expected in text, f"{name}: no {expected!r} in its output"
