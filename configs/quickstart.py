"""Quickstart: pretrained ResNet-20 + vmapped poisoned transfer-learning victims.

Everything it reads ships inside the package (a real CIFAR-10 sample of 30 train and
30 test images per class, and akamaster's pretrained ResNet-20), so it runs offline.
See jaxpoison/experiments/quickstart.py for what a trial is.

Command:
  python -m jaxpoison --config configs/quickstart.py --workdir /tmp/quickstart
  python -m jaxpoison --config configs/quickstart.py:runlocal --workdir /tmp/qs_small

Runtime and result: see README "Quickstart" (measured with the command above).
"""

import ml_collections

from jaxpoison.config_args import parse_arg


def get_config(arg=None):
    args = parse_arg(arg, num_targets=50, seed=0, chunk_size=50)
    config = ml_collections.ConfigDict()
    config.experiment = "quickstart"
    config.model = "resnet20"
    config.weights = ""  # empty: the ResNet-20 weights shipped in the package
    config.seed = args["seed"]
    config.num_targets = args["num_targets"]
    config.poison_counts = (0, 1, 4, 16)
    config.chunk_size = args["chunk_size"]
    config.victim = ml_collections.ConfigDict(
        dict(
            mode="linear",
            cold_start_head=True,
            optimizer="adam",
            learning_rate=0.01,
            epochs=40,
            batch_size=64,
        )
    )
    if args["runlocal"]:
        config.num_targets = args.local("num_targets", 4)
        config.chunk_size = args.local("chunk_size", 8)
        config.victim.epochs = 10
    return config
