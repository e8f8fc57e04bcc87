"""One driver per experiment family: `run(config, workdir)`."""

from __future__ import annotations

import importlib

from jaxpoison.errors import UserInputError

EXPERIMENTS = {
    "quickstart": "jaxpoison.experiments.quickstart",
    "frogs_benchmark": "jaxpoison.experiments.benchmark_transfer",  # attack "fc"
    "benchmark_transfer": "jaxpoison.experiments.benchmark_transfer",
    "frogs_oneshot": "jaxpoison.experiments.frogs_oneshot",
    "metapoison": "jaxpoison.experiments.metapoison",
    "gradient_matching": "jaxpoison.experiments.gradient_matching",
    "shielding": "jaxpoison.experiments.shielding",
    "backdoor_grid": "jaxpoison.experiments.backdoor_grid",
    "badnets_roadsigns": "jaxpoison.experiments.badnets_roadsigns",
    "frogs_e2e": "jaxpoison.experiments.frogs_e2e",
    "roadsigns_cleanlabel": "jaxpoison.experiments.roadsigns_cleanlabel",
    "defences": "jaxpoison.experiments.defences",
    "evaluate_poisons": "jaxpoison.experiments.evaluate_poisons",
}


def run(config, workdir: str):
    """Runs the experiment that `config.experiment` names."""
    name = config.get("experiment")
    if name not in EXPERIMENTS:
        raise UserInputError(
            f"unknown experiment {name!r}; known: {', '.join(sorted(EXPERIMENTS))}"
        )
    from jaxpoison.sweep.workdir import open_workdir

    module = importlib.import_module(EXPERIMENTS[name])
    with open_workdir(config, workdir):
        return module.run(config, workdir)
