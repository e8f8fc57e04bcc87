"""Command line: `python -m jaxpoison --config configs/<name>.py[:args] --workdir DIR`.

Bad input (an unknown name, a missing data dir, a class out of range, weights that
do not fit, an unknown config argument) ends with one line on stderr and exit code 2.
"""

from __future__ import annotations

import os
import sys

from absl import app, flags
from ml_collections import config_flags

from jaxpoison.errors import UserInputError

_CONFIG = config_flags.DEFINE_config_file(
    "config",
    None,
    "Experiment config file, e.g. configs/quickstart.py:runlocal.",
    lock_config=True,
)
_WORKDIR = flags.DEFINE_string("workdir", None, "Where results are written.")


def _fail(message: str) -> None:
    print(f"jaxpoison: error: {message}", file=sys.stderr)
    sys.exit(2)


def _parse_flags(argv: list[str]) -> list[str]:
    try:
        rest = flags.FLAGS(argv)
        if _CONFIG.value is None:
            _fail("--config is required, e.g. --config configs/quickstart.py")
    except UserInputError as e:
        _fail(str(e))
    except flags.Error as e:
        # Config files raise UserInputError inside flag parsing; absl wraps it.
        cause = e.__cause__ or e.__context__
        _fail(
            str(cause) if isinstance(cause, UserInputError) else str(e).splitlines()[0]
        )
    if not _WORKDIR.value:
        _fail("--workdir is required")
    return rest


def main(argv: list[str]) -> None:
    del argv
    from jaxpoison import experiments

    try:
        experiments.run(_CONFIG.value, os.path.expanduser(_WORKDIR.value))
    except UserInputError as e:
        _fail(str(e))


def run_main() -> None:
    app.run(main, flags_parser=_parse_flags)


if __name__ == "__main__":
    run_main()
