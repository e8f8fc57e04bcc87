"""Test-set predictions of several trained victims at once: vmapped or mapped.

Experiments end with a leading victim axis on the weights (`train_vmapped`'s output)
and score every victim on the test set. `jax.vmap` over the weights turns each
convolution into a grouped convolution with one group per victim; `jax.lax.map`
runs the victims one after another with plain convolutions. This times both, as one
jitted function each, for ResNet-20 on random uint8 images (`victims.evaluate`,
batches of 500), and checks that they predict the same classes. Medians of
`--repeats` calls after a compiling call, alternating the two forms.

Usage:
  python benchmarks/stacked_evaluation.py                 # 3 victims, 10,000 images
  python benchmarks/stacked_evaluation.py --victims 2 --images 2000 --repeats 3
"""

from __future__ import annotations

import argparse
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from jaxpoison.models import load_pretrained, shipped_weights
from jaxpoison.victims import evaluate


def stacked_victims(variables, victims: int):
    """`victims` copies of the weights, each scaled a little differently."""
    scales = jnp.linspace(0.99, 1.01, victims)
    return jax.tree.map(
        lambda a: scales.reshape((-1,) + (1,) * a.ndim).astype(a.dtype) * a,
        variables,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--victims", type=int, default=3)
    parser.add_argument("--images", type=int, default=10_000)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()

    model, variables = load_pretrained("resnet20", shipped_weights("resnet20"))
    trained = stacked_victims(variables, args.victims)
    rng = np.random.default_rng(0)
    images = jnp.asarray(rng.integers(0, 256, (args.images, 32, 32, 3), np.uint8))
    labels = jnp.asarray(rng.integers(0, 10, args.images).astype(np.int32))

    def predictions(v):
        return evaluate(model, v, images, labels)["predictions"]

    forms = {
        "vmap": jax.jit(jax.vmap(predictions)),
        "lax.map": jax.jit(lambda t: jax.lax.map(predictions, t)),
    }
    preds = {name: np.asarray(fn(trained)) for name, fn in forms.items()}
    times = {name: [] for name in forms}
    for _ in range(args.repeats):
        for name, fn in forms.items():
            start = time.perf_counter()
            jax.block_until_ready(fn(trained))
            times[name].append(time.perf_counter() - start)
    print(
        f"ResNet-20, {args.victims} victims x {args.images} images, "
        f"{jax.device_count()} device(s); median of {args.repeats}"
    )
    for name, ts in times.items():
        rounded = [round(t, 2) for t in ts]
        print(f"  {name:<8} {statistics.median(ts):8.2f} s  {rounded}")
    ratio = statistics.median(times["vmap"]) / statistics.median(times["lax.map"])
    print(f"  vmap / lax.map: {ratio:.2f}x")
    same = bool((preds["vmap"] == preds["lax.map"]).all())
    print(f"  same predictions: {same}")


if __name__ == "__main__":
    main()
