"""What several experiment drivers share (drivers never import each other)."""

from __future__ import annotations

import jax
import numpy as np

from jaxpoison.data import load_dataset
from jaxpoison.models import head_variables, load_pretrained, shipped_weights
from jaxpoison.victims import cache_features, make_train_data


def load_pretrained_and_data(config):
    """The pretrained model, its variables, the train/test splits, and the frozen
    test features with the pretrained model's class probabilities."""
    model, variables = load_pretrained(
        config.model, config.weights or shipped_weights(config.model)
    )
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
