"""Feature collision on the poisoning benchmark's 100 transfer-learning setups.

Schwarzschild et al. 2021, Table 1 protocol (see jaxpoison/experiments/
benchmark_transfer.py, whose attack "fc" this is; configs/benchmark_transfer.py:
attack=fc runs the same setups and victims, and attack=cp|bp the polytope
attacks): FC poisons crafted as the benchmark's craft_poisons_fc.py does,
victims = a fresh linear head on the frozen extractor, 40 epochs with augmentation.

Differences from the paper, stated: the benchmark's white-box extractor is a ResNet-18
pretrained on CIFAR-100, which is not available offline here; this config uses the
pretrained CIFAR-10 ResNet-20 (akamaster) as the frozen extractor, so the victim
retrains the last layer of a network trained on the same classes (closer to the
Poison Frogs one-shot-kill setting), and the data is our JPEG copy of CIFAR-10.

Command (needs a tfds data dir with cifar10, e.g. made by .ci/run):
  python -m jaxpoison --config configs/frogs_benchmark.py --workdir /tmp/frogs_bench \\
      --data_dir ~/.cache/jaxpoison/tfds
  python -m jaxpoison --config configs/frogs_benchmark.py:runlocal --workdir /tmp/fb

`runlocal`: 4 setups, 30 crafting iterations, 10 victim epochs WITHOUT augmentation
(so no per-crop feature cache), about 20 s. `smoke` (tests): 4 setups in chunks of 2,
victims on 30 images per class, 2 crafting iterations, 1 epoch.

Measured (the first command, 2-core CPU, idle machine): 6 min 21 s wall for all 100
setups with one JAX device per core (`cpu_devices = 0`; `--cpu_devices=1` for one
device); success 1/100 [0.2, 5.4]%, clean accuracy 83.13%. See README "Poison Frogs
on the poisoning benchmark".
"""

import ml_collections

from jaxpoison.config_args import parse_arg


def get_config(arg=None):
    args = parse_arg(arg, setups=100, chunk_size=10, seed=0, smoke=False)
    config = ml_collections.ConfigDict()
    config.experiment = "frogs_benchmark"
    config.model = "resnet20"
    config.weights = ""  # empty: the ResNet-20 shipped in the package
    config.data_dir = ""  # empty: --data_dir flag, then $TFDS_DATA_DIR
    config.setups = ""  # empty: the benchmark's setups shipped in the package
    config.num_setups = args["setups"]
    config.chunk_size = args["chunk_size"]
    config.seed = args["seed"]
    config.per_class = 250
    # One JAX device per CPU core (XLA:CPU runs many convolutions on one thread);
    # each device crafts and trains its share of a chunk's setups.
    config.cpu_devices = 0
    config.craft = ml_collections.ConfigDict(
        dict(
            iterations=120,
            step_size=0.001,
            step_rule="benchmark",
            constraint="linf",
            epsilon=8 / 255,
            watermark=0.3,
        )
    )
    config.victim = ml_collections.ConfigDict(
        dict(
            mode="linear",
            cold_start_head=True,
            optimizer="sgd",
            learning_rate=0.01,
            momentum=0.9,
            weight_decay=2e-4,
            batch_size=128,
            epochs=40,
            lr_milestones=(30,),
            augment=True,
            cache_augmented_features=True,
        )
    )
    if args["runlocal"]:
        config.num_setups = args.local("setups", 4)
        config.chunk_size = args.local("chunk_size", 4)
        config.craft.iterations = 30
        config.victim.epochs = 10
        config.victim.lr_milestones = (8,)
        config.victim.augment = False
        config.victim.cache_augmented_features = False
    if args["smoke"]:  # tests: 2 chunks of 2 setups, seconds each
        config.num_setups = args.local("setups", 4)
        config.chunk_size = args.local("chunk_size", 2)
        config.per_class = 30  # the 25 bases + 5 clean of the base class
        config.craft.iterations = 2
        config.victim.epochs = 1
        config.victim.lr_milestones = ()
        config.victim.augment = False
        config.victim.cache_augmented_features = False
    return config
