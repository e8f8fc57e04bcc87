"""Poisons from elsewhere against our victims and defences (issue 17, item 4).

`configs/evaluate_poisons.py` with `poisons_dir` = a folder of setups in the
poisoning benchmark's format (Schwarzschild et al. 2021: per setup a folder with
poisons.pickle, base_indices.pickle and target.pickle, as the benchmark's
craft_poisons_*.py or forest's `--save benchmark` write them; a triggered
backdoor's target.pickle also carries its patch and where it goes). Each setup is
a trial of the defence grid (experiments/poisonings.py, kind "benchmark_poisons"):
the victim of `protocol` ("transfer": the benchmark's linear head on the frozen
extractor, first `per_class` images per class with the bases replaced by the
poisons; "from_scratch": a network trained end to end) under every defence of
`config.defences`. Success: the target classified as the poisons' label.
"""

from __future__ import annotations

import ml_collections

from jaxpoison.experiments.poisonings import run_grid

ATTACK_FIELDS = (
    "poisons_dir",
    "protocol",
    "setups",
    "model",
    "weights",
    "init",
    "per_class",
    "examples",
    "test_examples",
    "victim",
    "chunk_size",
)


def run(config: ml_collections.ConfigDict, workdir: str) -> dict:
    attack = ml_collections.ConfigDict({"kind": "benchmark_poisons"})
    for field in ATTACK_FIELDS:
        attack[field] = config[field]
    return run_grid(config, {"poisons": attack}, workdir, "evaluate_poisons")
