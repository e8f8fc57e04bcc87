"""Victim training and evaluation as pure functions."""

from jaxpoison.victims.early_stopping import (
    early_stopping_trials,
    train_early_stopping,
)
from jaxpoison.victims.train import (
    TrainConfig,
    TrainData,
    cache_features,
    evaluate,
    make_train_data,
    poisoned_batch,
    train,
    train_vmapped,
)

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
