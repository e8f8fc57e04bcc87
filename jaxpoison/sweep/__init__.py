"""The sweep engine: trials in chunks; finished chunks are kept and resumed from.

`run_trials(Trial(run, row), shared, specs, ...)` is what experiments use;
`run_chunks` is its lower layer; `open_workdir` is the workdir contract;
`resume_steps` and `saved_unit` (steps.py) keep a step loop or a per-unit
artefact resumable.
"""

from jaxpoison.sweep.chunks import commit_chunks, run_chunks
from jaxpoison.sweep.keys import key_chain, named_key, trial_keys, trial_seeds
from jaxpoison.sweep.steps import eval_points, resume_steps, saved_arrays, saved_unit
from jaxpoison.sweep.trials import Trial, run_trials
from jaxpoison.sweep.workdir import open_workdir

__all__ = [
    "Trial",
    "commit_chunks",
    "eval_points",
    "key_chain",
    "named_key",
    "open_workdir",
    "resume_steps",
    "run_chunks",
    "run_trials",
    "saved_arrays",
    "saved_unit",
    "trial_keys",
    "trial_seeds",
]
