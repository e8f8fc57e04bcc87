"""Clean-label Poison Frogs on road signs (the replication study's protocol).

See jaxpoison/experiments/roadsigns_cleanlabel.py. A two-head ResNet-34 (4-way class
+ box, L1 box loss x 1/1000) is trained from scratch on the Kaggle road-sign images
(80% of the 877, seeded; the other 20% held out); per target (a held-out traffic
light the clean model gets right), `max_poisons` Algorithm 1 poisons from stop-sign
training images; victims retrain from the clean model with the backbone frozen (the
two heads train) or unfrozen (every layer) with 0..max_poisons poisons. Output: the
study's table per (backbone, n) over the targets (model accuracy, F1 of stop and of
traffic light, the target's softmax, poisoned or not), results.jsonl, summary.json,
poisoned.png.

Scaled down, stated: the study fine-tunes an ImageNet-pretrained ResNet-34 at full
resolution; no ImageNet weights exist offline here, so the network is trained from
scratch at `image_size` 32 px (mostly 150x200 images squeezed to 32x32), which the
CPU affords. The study's size: `image_size=224` (and more epochs).

Command (the Kaggle layout as the manual dir; road_signs is prepared into the tfds
data dir once):
  python -m jaxpoison \\
      --config configs/roadsigns_cleanlabel.py:manual_dir=../shared/data/roadsigns \\
      --workdir /tmp/rs_cleanlabel --data_dir ~/.cache/jaxpoison/tfds
  ... configs/roadsigns_cleanlabel.py:manual_dir=../shared/data/roadsigns,runlocal

Arguments: manual_dir=PATH, targets=N, image_size=N, max_poisons=N, chunk_size=N,
seed=N, runlocal (16 px, 2 targets, 2 poisons, a few epochs: a smoke run), smoke
(the CLI test's size: 16 px, 64 training images, 2 speedlimit targets in 2
chunks, 1 poison, 1 epoch each).

Measured (README "Clean-label Poison Frogs on road signs" has the table):
`roadsigns_cleanlabel.py:manual_dir=../shared/data/roadsigns,targets=3
--config.clean_training.epochs=10 --config.victim.unfrozen.epochs=1` took 29 min
57 s wall with other experiments on the 2 cores (18.6 CPU-min): clean model 67.6%
held-out, 0/3 targets poisoned at any n in either setting, the target's stop
probability rising with n (frozen 0.039 -> 0.077, unfrozen 0.089 -> 0.136).
"""

import ml_collections

from jaxpoison.config_args import parse_arg


def get_config(arg=None):
    args = parse_arg(
        arg,
        manual_dir="",
        targets=8,
        image_size=32,
        max_poisons=4,
        chunk_size=4,
        seed=0,
        smoke=False,
    )
    config = ml_collections.ConfigDict()
    config.experiment = "roadsigns_cleanlabel"
    config.data_dir = ""  # empty: --data_dir flag, then $TFDS_DATA_DIR
    config.manual_dir = args["manual_dir"]
    config.image_size = args["image_size"]
    config.test_fraction = 0.2
    config.max_train_images = 0  # 0: the whole training split
    config.base_class = "stop"
    config.target_class = "trafficlight"
    config.num_targets = args["targets"]
    config.max_poisons = args["max_poisons"]
    config.chunk_size = args["chunk_size"]
    config.seed = args["seed"]
    config.backbones = ("frozen", "unfrozen")
    config.clean_training = ml_collections.ConfigDict(
        dict(
            mode="end_to_end",
            optimizer="adam",
            learning_rate=1e-3,
            epochs=30,
            batch_size=32,
            box_loss_weight=1e-3,
        )
    )
    config.craft = ml_collections.ConfigDict(
        dict(
            iterations=300,
            step_size=0.01,
            step_rule="paper",
            constraint="prox",
            beta0=0.25,
            watermark=0.0,
        )
    )
    config.victim = ml_collections.ConfigDict(
        dict(
            frozen=dict(optimizer="adam", learning_rate=1e-3, epochs=20, batch_size=32),
            unfrozen=dict(
                optimizer="adam", learning_rate=1e-4, epochs=5, batch_size=32
            ),
        )
    )
    if args["runlocal"]:  # never overrides an argument given explicitly
        config.image_size = args.local("image_size", 16)
        config.num_targets = args.local("targets", 2)
        config.max_poisons = args.local("max_poisons", 2)
        config.chunk_size = args.local("chunk_size", 2)
        config.clean_training.epochs = 3
        config.craft.iterations = 20
        config.victim.frozen.epochs = 2
        config.victim.unfrozen.epochs = 1
    if args["smoke"]:  # the CLI test's size: 2 targets, one per chunk, 1 poison
        config.image_size = args.local("image_size", 16)
        config.max_train_images = 64
        # A clean model of 64 images and one epoch gets few traffic lights
        # right; speedlimit targets are always plentiful.
        config.target_class = "speedlimit"
        config.num_targets = args.local("targets", 2)
        config.max_poisons = args.local("max_poisons", 1)
        config.chunk_size = args.local("chunk_size", 1)
        config.clean_training.epochs = 1
        config.craft.iterations = 5
        config.victim.frozen.epochs = 1
        config.victim.unfrozen.epochs = 1
    return config
