"""What several experiment drivers share (drivers never import each other)."""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jaxpoison.data import load_dataset
from jaxpoison.models import head_variables, load_pretrained, shipped_weights
from jaxpoison.victims import cache_features, make_train_data


def pretrained_model(config):
    """Model `config.model` and its weights: `config.weights`, or those shipped."""
    return load_pretrained(
        config.model, config.weights or shipped_weights(config.model)
    )


def load_pretrained_and_data(config):
    """The pretrained model, its variables, the train/test splits, and the frozen
    test features with the pretrained model's class probabilities."""
    model, variables = pretrained_model(config)
    data_dir = config.data_dir or None
    train = load_dataset(config.dataset, "train", data_dir)
    test = load_dataset(config.dataset, "test", data_dir)
    test_features = cache_features(
        model, variables, make_train_data(test.images, test.labels)
    ).features
    test_probs = np.asarray(
        jax.nn.softmax(model.apply_head(head_variables(variables), test_features))
    )
    return model, variables, train, test, test_features, test_probs


class RowPool(NamedTuple):
    """The rows of a split that a sweep reads, and where each sits among them.

    A sweep loads the images (and caches the features) of its pool once; trials
    name images by pool position, so every trial of a chunk indexes one array.
    """

    rows: np.ndarray  # (P,) split rows in the pool, ascending
    position: np.ndarray  # (N,) pool position of every split row; -1 if absent

    def at(self, split_rows) -> np.ndarray:
        """Pool positions (int32) of `split_rows` (any shape); all in the pool."""
        positions = self.position[np.asarray(split_rows)]
        if np.any(positions < 0):
            raise ValueError("a row outside the pool")
        return positions


def row_pool(split_size: int, *row_sets) -> RowPool:
    """The pool of every row in `row_sets` (arrays of split rows, any shapes)."""
    rows = np.unique(np.concatenate([np.ravel(r) for r in row_sets]))
    position = np.full(split_size, -1, np.int32)
    position[rows] = np.arange(len(rows), dtype=np.int32)
    return RowPool(rows, position)


def scatter_rows(values, rows: np.ndarray, n: int) -> jax.Array:
    """An (n, ...) array holding `values` at `rows` and zeros elsewhere (pool rows
    whose clean value no trial reads: they are always replaced by poisons)."""
    return jnp.zeros((n, *values.shape[1:]), values.dtype).at[rows].set(values)
