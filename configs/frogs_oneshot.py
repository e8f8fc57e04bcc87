"""Poison Frogs' one-shot kill on a transfer-learning victim (Shafahi et al. 2018).

See jaxpoison/experiments/frogs_oneshot.py for what a trial is. Per target (a test
image the pretrained model classifies correctly) one poison is crafted with
Algorithm 1 (forward-backward splitting, beta0 = 0.25, beta = beta0 * (64 / 3072)^2)
from a base training image of another class; the victim's last layer is retrained
from a cold start (Adam, lr 0.01, 100 epochs, no augmentation) on a clean training
subset plus that one poison, next to a clean victim with the same seed and rows.

Tasks: "two_class" = dog (5) vs frog (6), CIFAR-10's stand-in for the paper's dog vs
fish (a mammal vs a small non-mammal animal); "ten_class" = all of CIFAR-10.

Differences from the paper, stated:
  * The frozen extractor is the CIFAR-10 ResNet-20 (akamaster, 64 features), not
    InceptionV3 pretrained on ImageNet (2048 features), and it was trained on the
    very classes (and training images) of the task.
  * The data is our JPEG copy of CIFAR-10 (32x32), not ImageNet dog/fish (299x299).
  * The clean training subset is the first `per_class` training images per class.
    The paper trains on 900 per class: N_train = 1801 <= 2048 x 2 = 4096, the regime
    where the last layer can fit any labelling (its argument for ~100% success).
    `per_class=25` (N_train 51 <= 128, 251 <= 640) puts ResNet-20's 64 features in
    that regime too; `per_class=250` (501 > 128, 2501 > 640) does not. Both run.
  * The poison is stored as an 8-bit image before victims train on it
    (`poison_8bit`); crafting stops at `iterations` (the paper's code uses an
    objective threshold; `craft.stop_distance` is available).

Command (needs a tfds data dir with cifar10, e.g. ~/.cache/jaxpoison/tfds):
  python -m jaxpoison --config configs/frogs_oneshot.py --workdir /tmp/frogs_oneshot \\
      --data_dir ~/.cache/jaxpoison/tfds
  python -m jaxpoison --config configs/frogs_oneshot.py:runlocal \\
      --workdir /tmp/fo_local --data_dir ~/.cache/jaxpoison/tfds

Arguments: targets=N (per task), per_class=P (one subset size instead of both),
chunk_size=N, seed=N, runlocal. Runlocal: 20 targets per task, per_class 25 only,
30 crafting iterations, 20 victim epochs.

Runtime and result (2-core CPU): see RESULTS below.
"""

import ml_collections

from jaxpoison.config_args import parse_arg


def get_config(arg=None):
    args = parse_arg(arg, targets=500, per_class=0, chunk_size=100, seed=0)
    config = ml_collections.ConfigDict()
    config.experiment = "frogs_oneshot"
    config.model = "resnet20"
    config.weights = ""  # empty: the ResNet-20 shipped in the package
    config.dataset = "cifar10"  # or "cifar10_sample" (shipped, 30 per class)
    config.data_dir = ""  # empty: --data_dir flag, then $TFDS_DATA_DIR
    config.tasks = ml_collections.ConfigDict(
        dict(two_class=(5, 6), ten_class=tuple(range(10)))
    )
    config.num_targets = args["targets"]  # per task
    config.per_class = (args["per_class"],) if args["per_class"] else (25, 250)
    config.chunk_size = args["chunk_size"]
    config.seed = args["seed"]
    config.poison_8bit = True
    config.craft = ml_collections.ConfigDict(
        dict(
            iterations=200,
            step_size=0.01,
            step_rule="paper",
            constraint="prox",
            beta0=0.25,
            watermark=0.0,
            stop_distance=0.0,
        )
    )
    config.victim = ml_collections.ConfigDict(
        dict(
            mode="linear",
            cold_start_head=True,
            optimizer="adam",
            learning_rate=0.01,
            batch_size=32,  # the authors' code (mini_batch_size = 32)
            epochs=100,
        )
    )
    if args["runlocal"]:
        config.num_targets = min(config.num_targets, 20)
        config.per_class = (args["per_class"] or 25,)
        config.chunk_size = 20
        config.craft.iterations = 30
        config.victim.epochs = 20
    return config
