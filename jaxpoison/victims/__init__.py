"""Victim training and evaluation as pure functions."""

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
    "evaluate",
    "make_train_data",
    "poisoned_batch",
    "train",
    "train_vmapped",
]
