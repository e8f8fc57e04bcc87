"""Algorithm 1 with an Adam forward step (attacks/feature_collision_adam.py) against
a float64 host loop written from the equations: hand-written Adam (Kingma & Ba
2015, Alg. 1) on a linear feature map, whose gradient is closed form."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxpoison import UserInputError
from jaxpoison.attacks import feature_collision_adam as fca
from jaxpoison.models import Model

SHAPE = (4, 4, 3)


def _linear_model(w):
    def apply(variables, x, train=False):
        del variables, train
        return None, x.reshape(x.shape[0], -1) @ w

    return Model(None, apply, None, None, "linear", SHAPE, 0)


def _reference(w, bases, targets, lr, beta, iterations):
    """The equations in numpy, one poison at a time."""
    b1, b2, eps = 0.9, 0.999, 1e-8
    out = []
    flat = zip(
        bases.reshape(len(bases), -1), targets.reshape(len(bases), -1), strict=True
    )
    for b, t in flat:
        x, m, v = b.copy(), np.zeros_like(b), np.zeros_like(b)
        ft = t @ w
        for k in range(1, iterations + 1):
            g = 2 * w @ (x @ w - ft)  # grad of ||W^T x - W^T t||^2
            m = b1 * m + (1 - b1) * g
            v = b2 * v + (1 - b2) * g * g
            step = (m / (1 - b1**k)) / (np.sqrt(v / (1 - b2**k)) + eps)
            x_hat = x - lr * step
            x = np.clip((x_hat + lr * beta * b) / (1 + lr * beta), 0.0, 1.0)
        out.append(x)
    return np.stack(out).reshape(bases.shape)


@pytest.mark.parametrize("beta, scale", [(0.25, False), (2.0, True)])
def test_adam_forward_backward_equals_the_equations(beta, scale):
    rng = np.random.default_rng(0)
    d = int(np.prod(SHAPE))
    w = rng.normal(size=(d, 5)) / np.sqrt(d)
    bases = rng.uniform(0.2, 0.8, size=(3, *SHAPE))
    targets = rng.uniform(0.0, 1.0, size=(3, *SHAPE))
    cfg = fca.AdamFCConfig(
        iterations=50, learning_rate=0.01, beta=beta, scale_beta=scale
    )
    with jax.enable_x64(True):
        model = _linear_model(jnp.asarray(w))
        poisons, state = jax.jit(lambda b, t: fca.craft(model, None, b, t, cfg))(
            jnp.asarray(bases), jnp.asarray(targets)
        )
    used_beta = beta * (5 / d) ** 2 if scale else beta
    ref = _reference(w, bases, targets, 0.01, used_beta, 50)
    np.testing.assert_allclose(poisons, ref, rtol=1e-9, atol=1e-12)
    assert int(state.iteration) == 50
    # The poisons moved toward their targets' features.
    before = np.linalg.norm((bases - targets).reshape(3, -1) @ w, axis=1)
    after = np.linalg.norm((ref - targets).reshape(3, -1) @ w, axis=1)
    assert np.all(after < before)


def test_bad_settings_are_one_line_errors():
    with pytest.raises(UserInputError, match="learning_rate"):
        fca.AdamFCConfig(learning_rate=0.0)
