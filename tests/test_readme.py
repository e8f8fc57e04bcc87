"""README's python blocks run as written (blocks fenced `python notest` only parse),
and what they print is what their comments say.

Each block runs in a fresh interpreter from a temporary folder, as a user pasting it
would run it: with JAXPOISON_WHEEL_PYTHON set (CI: an environment where the built
wheel is installed, without TensorFlow), that python with nothing of this checkout
on its path; unset, this checkout.
"""

from __future__ import annotations

import ast
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
FENCE = re.compile(r"^```python([^\n]*)\n(.*?)^```$", re.MULTILINE | re.DOTALL)


def readme_blocks() -> list[tuple[int, str, str]]:
    """(line, info string after `python`, code) of every python block of README."""
    text = (REPO / "README.md").read_text()
    return [
        (text.count("\n", 0, m.start()) + 1, m.group(1).strip(), m.group(2))
        for m in FENCE.finditer(text)
    ]


BLOCKS = readme_blocks()
RUN = [(line, code) for line, info, code in BLOCKS if info == ""]


def test_readme_has_a_runnable_block_and_every_block_parses():
    assert RUN, "README has no runnable python block"
    for line, info, code in BLOCKS:
        assert info in ("", "notest"), f"README line {line}: fence python {info}"
        ast.parse(code, filename=f"README.md:{line}")


@pytest.mark.parametrize("line, code", RUN, ids=[f"line{n}" for n, _ in RUN])
def test_readme_block_runs_as_written(line, code, tmp_path):
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "TF_CPP_MIN_LOG_LEVEL": "3"}
    python = os.environ.get("JAXPOISON_WHEEL_PYTHON")
    if python:
        env.pop("PYTHONPATH", None)
    else:
        python = sys.executable
        env["PYTHONPATH"] = os.pathsep.join(
            p for p in (str(REPO), env.get("PYTHONPATH", "")) if p
        )
    proc = subprocess.run(
        [python, "-c", code],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, f"README line {line}:\n{proc.stderr[-3000:]}"
    # `print(...)  # 0.8133` or `# [5 5 5 5]: why`: each printed line starts with
    # what its comment says.
    expected = [
        m.group(1).split(":")[0].strip()
        for m in re.finditer(r"^print\(.*\)\s+#\s*(.+)$", code, re.MULTILINE)
    ]
    printed = proc.stdout.splitlines()
    assert len(printed) == len(expected), proc.stdout
    for want, got in zip(expected, printed, strict=True):
        assert got.startswith(want), (
            f"README line {line}: printed {got!r}, says {want!r}"
        )
