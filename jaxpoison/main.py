"""Command line: `jaxpoison --config NAME[:args] --workdir DIR` (`python -m jaxpoison`).

`--config` takes an experiment's name (`quickstart`, `quickstart:runlocal`) or a path
(`configs/quickstart.py:runlocal`); `jaxpoison list` lists the experiments, `jaxpoison
report DIR` writes a run's report, `jaxpoison --help` shows both and every flag.

Bad input (an unknown name, a missing data dir, a class out of range, weights that
do not fit, an unknown config argument) ends with one line on stderr and exit code 2.
"""

from __future__ import annotations

import errno
import os
import signal
import sys

from absl import app, flags, logging
from ml_collections import config_flags

from jaxpoison.errors import Interrupted, UserInputError

_CONFIG = config_flags.DEFINE_config_file(
    "config",
    None,
    "Experiment: a name from `jaxpoison list` or a config file, with optional "
    "arguments: quickstart, quickstart:runlocal, configs/quickstart.py:runlocal.",
    lock_config=True,
)
_WORKDIR = flags.DEFINE_string("workdir", None, "Where results are written.")
_DISTRIBUTED = flags.DEFINE_bool(
    "distributed",
    False,
    "Call jax.distributed.initialize() first (Cloud TPU VM slices, Slurm, MPI).",
)
_PROCESSES = flags.DEFINE_integer(
    "processes",
    1,
    "JAX processes to run on this machine, each pinned to its share of the cores "
    "and joined by jax.distributed; the sweep's trials are split over them, and "
    "results go to --workdir as with one process. Victim training alone runs "
    "1.03-1.32x faster with one process per core (benchmarks/victim_speed.py), but "
    "every process repeats the work outside the sweep on its own cores, so whole "
    "experiments ran 0.5-0.94x as fast as the default (README, Speed).",
)
_CPU_DEVICES = flags.DEFINE_integer(
    "cpu_devices",
    None,
    "CPU devices for JAX's CPU backend: 0 = one per core (up to 8), 1 = one device "
    "using every core. Default: the config's `cpu_devices`, else 0: trials are split "
    "over the devices, and XLA:CPU runs most convolutions on one thread, so one "
    "device per core is the fastest sweep (benchmarks/per_device.py, "
    "benchmarks/victim_speed.py).",
)
_COMPILATION_CACHE = flags.DEFINE_string(
    "compilation_cache",
    None,
    "Folder where JAX keeps compiled programs, so that a rerun or a resumed run "
    "loads them instead of compiling again (one process only); empty: no cache. "
    "Default: $JAX_COMPILATION_CACHE_DIR, else $JAXPOISON_COMPILATION_CACHE, else "
    "~/.cache/jaxpoison/xla/<kind of CPU>.",
)
_DATA_DIR = flags.DEFINE_string(
    "data_dir", None, "tensorflow-datasets data dir (default: $TFDS_DATA_DIR)."
)
_DOWNLOAD = flags.DEFINE_bool(
    "download",
    False,
    "Let tensorflow-datasets download and prepare a missing dataset (cifar10, "
    "tf_flowers) into the data dir; needs the internet and the [data] extra.",
)
_MANUAL_DIR = flags.DEFINE_string(
    "manual_dir",
    None,
    "Road signs: the extracted Kaggle 'Road Sign Detection' archive (images/, "
    "annotations/) that our tfds builder prepares into the data dir once.",
)

# The command line `run_main` parsed (config names resolved to files): what
# `--processes` starts again in each process.
_COMMAND_LINE: list[str] = []

USAGE = """\
Usage:
  jaxpoison --config NAME[:ARGS] --workdir DIR [flags]   run an experiment
  jaxpoison list                                          list the experiments
  jaxpoison report DIR [--by FIELD,...]                   write DIR/report.md
(`python -m jaxpoison` is the same command.) NAME is an experiment below or a
config file (configs/NAME.py); ARGS select a variant, e.g. quickstart:runlocal.
Config fields are overridden with --config.FIELD=VALUE.
"""


def _fail(message: str) -> None:
    print(f"jaxpoison: error: {message}", file=sys.stderr)
    sys.exit(2)


def _flag_error_line(error: Exception) -> str:
    """One line for an error raised while parsing flags and loading the config.

    ml_collections wraps what `get_config` raises into errors whose messages embed
    tracebacks, defers a missing config file until the config is read, and raises
    AttributeError for an override of a field that does not exist; each becomes the
    one line that names the problem.
    """
    seen = error
    while seen is not None and not isinstance(seen, UserInputError):
        seen = seen.__cause__ or seen.__context__
    text = str(seen if seen is not None else error)
    # ml_collections re-raises a config's error as the same type, with a message
    # holding the original traceback; the original message follows the type name.
    marker = f"{UserInputError.__name__}: "
    if marker in text:
        return text.split(marker, 1)[1].splitlines()[0]
    if seen is not None:
        return next((line for line in text.splitlines() if line.strip()), text)
    if "has no attribute 'get_config'" in text:
        return "the config file has no get_config(arg) function (see configs/)"
    if "Failed loading config file" in text:
        reason = [line.strip() for line in text.splitlines() if "[Errno" in line]
        return f"cannot load the config file: {(reason or [text])[0]}"
    if isinstance(error, AttributeError | KeyError):
        field = text.strip("\"'")
        return f"no config field {field!r} to override (check the --config.* flags)"
    return next((line for line in text.splitlines() if line.strip()), text)


def _parse_flags(argv: list[str]) -> list[str]:
    try:
        rest = flags.FLAGS(argv)
        if _CONFIG.value is None:
            _fail("--config is required, e.g. --config configs/quickstart.py")
        getattr(_CONFIG.value, "experiment", None)  # raises a deferred load error
    except Exception as e:  # noqa: BLE001 - every parse failure becomes one line
        _fail(_flag_error_line(e))
    if not _WORKDIR.value:
        _fail("--workdir is required")
    return rest


def main(argv: list[str]) -> None:
    del argv
    if not flags.FLAGS["verbosity"].present:
        # orbax logs every checkpoint step at INFO; progress bars say enough.
        logging.set_verbosity(logging.WARNING)
    from jaxpoison.distributed import (
        MAX_CPU_DEVICES,
        WORKDIR_ENV,
        allowed_cores,
        cpu_cores,
        failures_exit_at_once,
        local_process,
        maybe_initialize,
        run_local_processes,
        split_cpu_into_devices,
    )

    workdir = os.path.expanduser(_WORKDIR.value)
    if local_process() is None and _PROCESSES.value != 1:
        cores = len(allowed_cores())
        if not 1 <= _PROCESSES.value <= cores:
            _fail(
                f"--processes={_PROCESSES.value}: a count from 1 to {cores} (one "
                f"process per core at most; this machine has {cores} cores)"
            )
        if _DISTRIBUTED.value:
            _fail("--processes runs a cluster on this machine; drop --distributed")
        sys.exit(run_local_processes(_COMMAND_LINE[1:], _PROCESSES.value, workdir))
    # A process other than 0 of a local cluster writes its own copy.
    workdir = os.environ.get(WORKDIR_ENV, workdir)

    cpu_devices = _CPU_DEVICES.value
    if cpu_devices is None:
        cpu_devices = _CONFIG.value.get("cpu_devices", 0)
    limit = max(cpu_cores(), MAX_CPU_DEVICES)
    if not 0 <= cpu_devices <= limit:
        _fail(
            f"--cpu_devices={cpu_devices}: 0 (one per core) or a count from 1 to "
            f"{limit} (this machine has {cpu_cores()} cores)"
        )
    if cpu_devices != 1 and not _DISTRIBUTED.value:
        split_cpu_into_devices(cpu_devices)  # before JAX's backends start
    maybe_initialize(_DISTRIBUTED.value)  # before any other use of JAX
    import jax

    from jaxpoison import compilation_cache

    compilation_cache.enable(_COMPILATION_CACHE.value, jax.process_count())

    from jaxpoison import experiments
    from jaxpoison.data import DOWNLOAD_ENV, MANUAL_DIR_ENV

    if _DATA_DIR.value:  # configs with an empty data_dir read $TFDS_DATA_DIR
        os.environ["TFDS_DATA_DIR"] = os.path.expanduser(_DATA_DIR.value)
    # Where data comes from, not what is computed: environment, not config fields
    # (a run's config.json, and so its resume check, does not depend on them).
    if _DOWNLOAD.value:
        os.environ[DOWNLOAD_ENV] = "1"
    if _MANUAL_DIR.value:
        os.environ[MANUAL_DIR_ENV] = os.path.expanduser(_MANUAL_DIR.value)

    with failures_exit_at_once():
        execute(experiments.run, _CONFIG.value, workdir)
    if jax.process_index() == 0:
        print(finished_message(workdir), flush=True)


def finished_message(workdir: str) -> str:
    """Where a finished run's results are, and how to read them."""
    path = os.path.abspath(workdir)
    written = [
        name
        for name in ("results.jsonl", "summary.json")
        if os.path.exists(os.path.join(path, name))
    ]
    return (
        f"jaxpoison: results in {path}"
        + (f" ({', '.join(written)})" if written else "")
        + f"; report: jaxpoison report {path}"
    )


def execute(run, config, workdir: str) -> None:
    """`run(config, workdir)`, with every expected failure as one line and a code.

    Bad input: `jaxpoison: error: ...`, exit 2 (also for an experiment that needs
    the `data` extra, not installed). Ctrl-C or SIGTERM: where the run
    got to and how to resume, exit 130 / 143. A full disk: one line, exit 2; the
    chunks committed before it are kept, so the same command resumes.
    """
    signal.signal(signal.SIGTERM, _raise_interrupted)
    try:
        run(config, workdir)
    except UserInputError as e:
        _fail(str(e))
    except ModuleNotFoundError as e:
        if (e.name or "").split(".")[0] not in ("tensorflow", "tensorflow_datasets"):
            raise
        _fail(
            f"{config.get('experiment')} reads its data through tensorflow-datasets, "
            "which the base install leaves out: pip install 'jaxpoison[data]' "
            "(README: Getting the data)"
        )
    except (KeyboardInterrupt, Interrupted) as e:
        where = getattr(e, "progress", None)
        print(
            f"jaxpoison: interrupted{f' after {where}' if where else ''}; rerun the "
            "same command to resume",
            file=sys.stderr,
        )
        sys.exit(128 + (e.signum if isinstance(e, Interrupted) else signal.SIGINT))
    except OSError as e:
        if e.errno != errno.ENOSPC:
            raise
        _fail(
            f"no space left on the device writing {e.filename or 'results'}; free "
            "space and rerun the same command to resume"
        )


def _raise_interrupted(signum, frame) -> None:
    del frame
    raise Interrupted(signum)


def help_text() -> str:
    """`--help`: usage, the experiments (from the config files), the flags."""
    from jaxpoison import catalog

    return "\n".join(
        [
            USAGE,
            "Experiments (configs/NAME.py; its docstring gives the command, the "
            "variants\nand the runtime):",
            catalog.listing(),
            "",
            "Flags:",
            flags.FLAGS.module_help(__name__).split("\n", 2)[-1],
            "",
            "Every absl flag: --helpfull. Data: README, 'Getting the data'.",
        ]
    )


_HELP = ("-h", "--help", "-help", "--helpshort", "-?")


def _resolve_config_flag(argv: list[str]) -> list[str]:
    """`--config NAME[:args]` -> the config file's path (see catalog.resolve_config)."""
    from jaxpoison import catalog

    out = list(argv)
    for i, arg in enumerate(out):
        if arg in ("--config", "-config") and i + 1 < len(out):
            out[i + 1] = catalog.resolve_config(out[i + 1])
        elif arg.startswith(("--config=", "-config=")):
            flag, value = arg.split("=", 1)
            out[i] = f"{flag}={catalog.resolve_config(value)}"
    return out


def run_main(argv: list[str] | None = None) -> None:
    """The `jaxpoison` console script (and `python -m jaxpoison`)."""
    argv = list(sys.argv if argv is None else argv)
    command = argv[1] if len(argv) > 1 else None
    if command == "list":
        from jaxpoison import catalog

        print(catalog.listing())
        sys.exit(0)
    if command == "report":
        from jaxpoison import report

        sys.exit(report.main(argv[2:], prog="jaxpoison report"))
    if len(argv) == 1 or any(a in _HELP for a in argv[1:]):
        print(help_text())
        sys.exit(0 if len(argv) > 1 else 2)
    try:
        argv = _resolve_config_flag(argv)
    except UserInputError as e:
        _fail(str(e))
    _COMMAND_LINE[:] = argv
    app.run(main, argv=argv, flags_parser=_parse_flags)


if __name__ == "__main__":
    run_main()
