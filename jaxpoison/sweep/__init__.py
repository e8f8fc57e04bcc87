"""The sweep engine: trials in chunks; finished chunks are kept and resumed from.

`run_trials(Trial(run, row), shared, specs, ...)` is what experiments use;
`run_chunks` is its lower layer; `open_workdir` is the workdir contract.
"""

from jaxpoison.sweep.chunks import commit_chunks, run_chunks
from jaxpoison.sweep.keys import named_key, trial_keys, trial_seeds
from jaxpoison.sweep.trials import Trial, run_trials
from jaxpoison.sweep.workdir import open_workdir

__all__ = [
    "Trial",
    "commit_chunks",
    "named_key",
    "open_workdir",
    "run_chunks",
    "run_trials",
    "trial_keys",
    "trial_seeds",
]
