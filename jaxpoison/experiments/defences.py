"""Every attack x every defence (issue 17, item 3): `configs/defences.py`.

The attacks are the `config.attacks` entries (registry and kinds in
experiments/poisonings.py): feature collision, convex polytope and bullseye
polytope on the poisoning benchmark's transfer setups, gradient matching on its
from-scratch setups, BadNets and a blended backdoor. The defences
(jaxpoison/defences/): no defence; the filters spectral signatures (Tran et al.
2018), activation clustering (Chen et al. 2018) and deep k-NN (Peri et al. 2020),
each followed by retraining on the filtered set; the training-time defences
DP-SGD-style clipping and noise (Hong et al. 2020), input mixup and cutout
(Borgnia et al. 2021). Per attack, one resumable sweep (`<workdir>/<attack>/`):
a trial (a setup, or a seed of a backdoor) trains every defence's victim in one
program. Outputs: results.jsonl (a row per trial and defence), summary.json (the
attack x defence table), tables.md, success_vs_accuracy.png.
"""

from __future__ import annotations

import ml_collections

from jaxpoison.experiments.poisonings import run_grid


def run(config: ml_collections.ConfigDict, workdir: str) -> dict:
    return run_grid(config, dict(config.attacks.items()), workdir, "defences")
