"""Victim training and evaluation as pure functions.

Modules: `config` (TrainConfig), `data` (TrainData and the batches with poisons
swapped in), `features` (the frozen-feature cache of linear victims), `train` (the
trainer and `evaluate`), `early_stopping`, `loops`, `augment`, `regularizers`.
"""

from jaxpoison.victims.config import TrainConfig
from jaxpoison.victims.data import TrainData, make_train_data, poisoned_batch
from jaxpoison.victims.early_stopping import (
    early_stopping_trials,
    train_early_stopping,
)
from jaxpoison.victims.features import cache_features
from jaxpoison.victims.train import evaluate, train, train_vmapped

__all__ = [
    "TrainConfig",
    "TrainData",
    "cache_features",
    "early_stopping_trials",
    "evaluate",
    "make_train_data",
    "poisoned_batch",
    "train",
    "train_early_stopping",
    "train_vmapped",
]
