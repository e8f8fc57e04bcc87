"""The systematic backdoor evaluation of Truong et al. 2020, as a vectorised grid.

See jaxpoison/experiments/backdoor_grid.py for the protocol. Per dataset (CIFAR-10,
flowers), the data is split 76/19/5 into poison-set / clean-set / adversarial test
(the first two 80/20 train/val); the victim trains on the poisoned poison-set with
early stopping (patience 5 on the poisoned val accuracy), then is fine-tuned on the
clean-set (the defence), early-stopped on the clean val accuracy. Grid: trigger
(black square, random square, sine, low variance) x alpha x poison rate x
one-to-one / many-to-one x regulariser (none, logit squeezing, manifold mixup,
contrastive, soft nearest neighbour) x fine-tuning (before / after), every cell over
`seeds` seeds. Cells are not a full factorial but the slices Truong et al. report:
per trigger an alpha curve (at rate 0.1) and a rate curve (at the trigger's alpha,
rate 0 = the clean victim), one-to-one at the default cell, and every regulariser
at the default cell of `regularizer_triggers`.

Size (default): 1,500 images per dataset at 32 x 32 (poison-set train 912 / val 228,
clean-set train 228 / val 57, adversarial test 74 minus the poison class; one image
is held out for the low-variance trigger; about 9 CIFAR-10 / 16 flowers poisons at
lambda 0.1), ResNet-20
fine-tuned end to end from the CIFAR-10 weights shipped in the package (a fresh
5-class head for flowers; on CIFAR-10 the weights saw these very images: the clean
accuracy is high from the start, the backdoor still has to be learned), SGD lr 0.01
momentum 0.9, batch 64, at most 6 epochs (patience 5), fine-tuning at most 4 epochs;
2 seeds; 32 cells x 2 seeds = 64 runs per dataset, 128 in all. Runs of one
regulariser (every trigger, alpha, rate, strategy and seed: poisons are per-trial
arrays with -1 padding) are one resumable sweep (`workdir/<dataset>/<regulariser>`):
each chunk of `chunk_size` runs is trained, fine-tuned and evaluated by one jitted
program (`lax.map` over runs on CPU, `vmap` elsewhere); a killed run resumes at
its first unfinished chunk.

The paper's size, one argument away (`paper`): all images (CIFAR-10's 60,000;
flowers' 4,317), 100 epochs at most with patience 5, 5 seeds, alphas 0.05..1 and
rates 0.01..0.2, all triggers for every regulariser. Their victims are ImageNet
ResNet-50 / NasNet(-Mobile) at 224 px (flowers) and 32 px (CIFAR-10); ours stays a
ResNet-20 at `image_size` (flowers at 224 px: `image_size=224`).

Command (cifar10 needs a tfds data dir, e.g. ~/.cache/jaxpoison/tfds; flowers the
ImageFolder root):
  python -m jaxpoison --config configs/backdoor_grid.py --workdir /tmp/backdoor \\
      --data_dir ~/.cache/jaxpoison/tfds
  python -m jaxpoison --config configs/backdoor_grid.py:runlocal \\
      --workdir /tmp/backdoor_local --data_dir ~/.cache/jaxpoison/tfds

Arguments: examples=N (per dataset; 0 = all), seeds=N, epochs=N (max),
datasets=cifar10+flowers, flowers_dir=PATH (default ../shared/data/flowers
relative to the repository), image_size=N, seed=N, chunk_size=N (runs per
program and per resume step), paper, runlocal (CIFAR-10 only, 300 images, 2
triggers, 2 regularisers, 2 epochs: 14 runs, ~50 s), smoke (the shipped CIFAR-10
sample, 4 runs of 1 epoch in 2 chunks: the CLI test).

Measured (2-core CPU, README "Backdoors" has the tables): the default's CIFAR-10
half (`backdoor_grid.py:datasets=cifar10`, 64 runs + fine-tuning) took 22 min 23 s
wall with another job on the cores for 12 of them (174 runs per hour); the flowers
half (`datasets=flowers`) 17 min 20 s (224 runs per hour): ~40 min in all.
Result (CIFAR-10, 2 seeds): black-square ASR 11.8% (clean victim 2.9%), the other
triggers 1.5-5.1%; logit squeezing, SNN and contrastive lower it, mixup does not;
clean fine-tuning leaves it at 10.3%. runlocal is a smoke run whose numbers mean
nothing.
"""

import os

import ml_collections

from jaxpoison.config_args import parse_arg

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def get_config(arg=None):
    args = parse_arg(
        arg,
        examples=1500,
        seeds=2,
        epochs=6,
        datasets="cifar10+flowers",
        flowers_dir="",
        image_size=32,
        seed=0,
        paper=False,
        smoke=False,
        chunk_size=8,
    )
    config = ml_collections.ConfigDict()
    config.experiment = "backdoor_grid"
    config.datasets = tuple(args["datasets"].split("+"))
    config.data_dir = ""  # cifar10's tfds dir: --data_dir flag, then $TFDS_DATA_DIR
    config.flowers_dir = args["flowers_dir"] or os.path.join(
        REPO, "..", "shared", "data", "flowers"
    )
    config.image_size = args["image_size"]  # flowers are resized to this
    config.examples = args["examples"]  # per dataset, a seeded random subset
    config.model = "resnet20"
    config.init = "pretrained"  # the shipped CIFAR-10 weights; "scratch": fresh
    config.poison_class = 0  # airplane / daisy
    config.one_to_one_source = 1  # automobile / dandelion
    # Truong et al. Sec. 3.2: each trigger's alpha in their experiments.
    config.triggers = ml_collections.ConfigDict(
        dict(black_square=1.0, random_square=1.0, sine=0.1, low_variance=0.5)
    )
    config.sine_reference_width = 224  # the sine keeps its period per image width
    config.alphas = (0.1, 0.5, 1.0)
    config.rate = 0.1  # Truong et al. Table 1's lambda
    config.rates = (0.0, 0.02, 0.05, 0.1)
    config.one_to_one = True
    config.regularizers = ml_collections.ConfigDict(
        dict(
            none={},
            logit_squeeze=dict(logit_squeeze=0.05),
            mixup=dict(mixup=1.0),
            contrastive=dict(contrastive=0.01, contrastive_margin=10.0),
            snn=dict(snn=0.1, snn_temperature=10.0),
        )
    )
    config.regularizer_triggers = ("black_square",)
    config.seeds = args["seeds"]
    config.seed = args["seed"]
    config.split = (0.76, 0.19, 0.05)
    config.inner_split = (0.8, 0.2)
    config.patience = 5
    config.victim = ml_collections.ConfigDict(
        dict(
            mode="end_to_end",
            optimizer="sgd",
            learning_rate=0.01,
            momentum=0.9,
            weight_decay=5e-4,
            batch_size=64,
            epochs=args["epochs"],
        )
    )
    config.finetune_patience = 5
    config.finetune = ml_collections.ConfigDict(
        dict(
            mode="end_to_end",
            optimizer="sgd",
            learning_rate=0.01,
            momentum=0.9,
            weight_decay=5e-4,
            batch_size=64,
            epochs=4,
        )
    )
    config.trials = "auto"  # "map" (lax.map, CPU) or "vmap" per program
    config.chunk_size = args["chunk_size"]  # runs per program and per resume step
    # Variants never override an argument the command line gave (`args.local`).
    if args["paper"]:
        config.examples = args.local("examples", 0)
        config.seeds = args.local("seeds", 5)
        config.victim.epochs = args.local("epochs", 100)
        config.finetune.epochs = 20
        config.alphas = (0.05, 0.1, 0.2, 0.5, 1.0)
        config.rates = (0.0, 0.01, 0.02, 0.05, 0.1, 0.2)
        config.regularizer_triggers = tuple(config.triggers.keys())
    if args["runlocal"]:
        config.datasets = tuple(args.local("datasets", "cifar10").split("+"))
        config.examples = args.local("examples", 300)
        config.triggers = ml_collections.ConfigDict(dict(black_square=1.0, sine=0.1))
        config.alphas = ()
        config.rates = (0.0,)
        config.regularizers = ml_collections.ConfigDict(
            dict(none={}, logit_squeeze=dict(logit_squeeze=0.05))
        )
        config.victim.epochs = args.local("epochs", 2)
        config.finetune.epochs = 1
        config.victim.batch_size = 32
        config.finetune.batch_size = 32
        # The 12 runs without a regulariser: 2 chunks of one shape.
        config.chunk_size = args.local("chunk_size", 6)
    if args["smoke"]:  # the CLI test: the shipped sample, 4 runs in 2 chunks
        config.datasets = tuple(args.local("datasets", "cifar10_sample").split("+"))
        config.examples = args.local("examples", 200)
        config.triggers = ml_collections.ConfigDict(dict(black_square=1.0))
        config.alphas = ()
        config.rates = (0.0,)
        config.one_to_one = False
        config.regularizers = ml_collections.ConfigDict(dict(none={}))
        config.seeds = args.local("seeds", 2)
        config.victim.epochs = args.local("epochs", 1)
        config.finetune.epochs = 1
        config.victim.batch_size = 32
        config.finetune.batch_size = 32
        config.chunk_size = args.local("chunk_size", 2)
    return config
