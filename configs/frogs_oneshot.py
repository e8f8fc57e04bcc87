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
  * The data is our JPEG copy of CIFAR-10 (32x32), not ImageNet dog/fish (299x299);
    on it the shipped ResNet-20 classifies 81.03% of the 10,000 test images right.
  * Targets are test images the pretrained model classifies correctly (the paper
    attacks every test image); bases are training images outside the clean subset
    (the authors' code takes them from the test set).
  * The clean training subset is the first `per_class` training images per class.
    The paper trains on 900 per class: N_train = 1801 <= 2048 x 2 = 4096, the regime
    where the last layer can fit any labelling (its argument for ~100% success).
    per_class 10 and 25 (N_train 21 / 51 <= 128; 101 / 251 <= 640) put ResNet-20's
    64 features in that regime too, per_class 250 (501 > 128; 2501 > 640) does not.
  * Victim batch 32 as in the authors' code (coldStartPerformance.py); Algorithm 1
    with beta0 = 0.25 (their main_oneShot.py uses 0.2 and up to 1000 iterations with
    an objective threshold); here 200 iterations from step 0.01 with the "paper"
    halving rule. The poison is stored as an 8-bit image (`poison_8bit`).

Command (needs a tfds data dir with cifar10, e.g. ~/.cache/jaxpoison/tfds):
  python -m jaxpoison --config configs/frogs_oneshot.py --workdir /tmp/frogs_oneshot \\
      --data_dir ~/.cache/jaxpoison/tfds
  python -m jaxpoison --config configs/frogs_oneshot.py:runlocal \\
      --workdir /tmp/fo_local --data_dir ~/.cache/jaxpoison/tfds

Arguments: targets=N (per task), per_class=P (one subset size instead of three),
chunk_size=N, seed=N, runlocal (20 targets per task, per_class 25 only, 100 crafting
iterations, 50 victim epochs), smoke (tests: 4 targets per task on the shipped
cifar10_sample, per_class 3, 2 crafting iterations, 2 epochs; no data dir needed).

Measured on the 2-core CPU (jax 0.10.2), nothing else running:
  * The full command above: 7 min 39 s wall, 2.2 GB peak memory; 500 targets per
    task. Success (target classified as the base class) with 95% Wilson interval,
    median base-class confidence over the successes, clean test accuracy drop
    (clean victim minus poisoned victim, same seed, target left out) mean / worst,
    mean angular deviation of the boundary (in brackets: between two clean victims
    of different seeds), and how often the poisoned victim fits the poison:
      two_class N=21:   91.0% [88.2, 93.2], conf 82.8%, drop 5.23 / 17.16 points,
                        41.0 deg (35.0), poison fit 92%
      two_class N=51:   64.2% [59.9, 68.3], conf 68.9%, drop 2.71 / 8.80,
                        39.6 deg (30.5), poison fit 63%
      two_class N=501:   4.0% [2.6, 6.1],   conf 64.1%, drop 0.36 / 1.35,
                        25.7 deg (12.5), poison fit 5%
      ten_class N=101:  77.6% [73.7, 81.0], conf 70.9%, drop 0.91 / 4.67,
                        32.1 deg (24.6), poison fit 82%
      ten_class N=251:  58.6% [54.2, 62.8], conf 65.7%, drop 0.42 / 1.66,
                        31.4 deg (17.3), poison fit 61%
      ten_class N=2501:  1.6% [0.8, 3.1],   conf 49.9%, drop 0.02 / 0.32,
                        13.2 deg (6.6), poison fit 1.4%
    Where the victim fits the poison the target follows it (two_class N=51: 97.1%
    of 315, ten_class N=251: 91.5% of 306): the one-shot kill works exactly as far
    as the retrained layer can fit one outlier, which is the paper's argument; with
    64 features that needs far smaller training sets than with InceptionV3's 2048.
    Poisons end 0.41 from their targets in feature space (bases start 6.7 away),
    at l2 3.5 / l_inf 0.38 from their bases in [0, 1] pixels (beta is tiny here).
    Published (InceptionV3, dog vs fish, 1099 targets): 100% success, median
    confidence 99.6%, accuracy drop 0.2% mean / 0.4% worst.
  * runlocal: 29 s wall; two_class N=51 25.0% [11.2, 46.9] and ten_class N=251
    5.0% [0.9, 23.6] of 20 (50 epochs leave most poisons unfitted: a smoke run).
"""

import ml_collections

from jaxpoison.config_args import parse_arg


def get_config(arg=None):
    args = parse_arg(arg, targets=500, per_class=0, chunk_size=100, seed=0, smoke=False)
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
    config.per_class = (args["per_class"],) if args["per_class"] else (10, 25, 250)
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
        config.num_targets = args.local("targets", 20)
        config.per_class = (args["per_class"] or 25,)
        config.chunk_size = args.local("chunk_size", 20)
        config.craft.iterations = 100
        config.victim.epochs = 50
    if args["smoke"]:  # tests: the shipped sample, two chunks of two per task
        config.dataset = "cifar10_sample"
        config.num_targets = args.local("targets", 4)
        config.per_class = (args["per_class"] or 3,)
        config.chunk_size = args.local("chunk_size", 2)
        config.craft.iterations = 2
        config.victim.epochs = 2
    return config
