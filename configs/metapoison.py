"""MetaPoison (Huang et al. 2020) against Poison Frogs, fine-tuned and from scratch.

See jaxpoison/experiments/metapoison.py. Setup (the authors' quickstart,
wronnyhuang/metapoison README, parse.py): a CIFAR-10 training subset (the first
`per_class` images of each class), the `num_poisons` first dogs of it as bases, the
first bird(s) of the test set as targets; MetaPoison with K = 2 unrolled SGD steps,
batch 125, Adam on the perturbation (craft rate 200/255, dropped x0.1 twice,
squared warmup), CW objective, eps 8/255, random start; victims from scratch (plain
SGD lr 0.1, batch 125; the authors' victim without their 5-epoch warmup) and
fine-tuned from the shipped ResNet-20 (SGD momentum 0.9, lr 0.01), beside Poison
Frogs and the unperturbed bases.

Variants:
  * default (the CPU size: 43 min 29 s wall on the idle 2-core machine, peak
    RSS 6.6 GB, 2026-12-02, after the weight-gradient memory fix
    (benchmarks/README.md "Weight-gradient form, again"; before it 26 min 44 s
    and 15.8 GB; 32 min 58 s and 6.2 GB on 2026-12-01); fine-tuned victims 0/6
    [0, 39.0], CW margin 1.85 against 9.61 for the clean bases (0/6 and 2/6 in
    the two earlier runs); victims from scratch at ~40% test accuracy; README
    "MetaPoison"):
    1,000 images (100 per class), 10 poisons (1%), 2 targets, 3
    seeds. Each victim kind gets poisons crafted for it (`craft_for`): the
    fine-tuned victims' by 2 surrogates fine-tuned from the pretrained ResNet-20
    (lr 0.01, 10 craft steps: the setting that works on the CPU); the from-scratch
    victims' as the paper does, by 2 surrogates trained from scratch at staggered
    epochs (0 and 10 of a 20-epoch period, lr 0.1 with a 5-epoch warmup, 16 craft
    steps). Victims: fine-tuned 5 epochs; from scratch 20 epochs (x0.1 at 10, 15).
  * quickstart: the authors' quickstart size: 5,000 images, 50 poisons, M = 24
    surrogates from scratch staggered one epoch apart, 61 craft steps; victims
    from scratch 200 epochs (x0.1 at 100 and 150) and fine-tuned 20 epochs; 8
    seeds; one crafting for both victim kinds.
  * paper: the paper's CIFAR-10 size: all 50,000 images, 500 poisons (1%), 10
    targets, the quickstart's crafting per victim kind (fine-tuned surrogates for
    the fine-tuned victims, from scratch for the others). For an accelerator:
      python -m jaxpoison --config configs/metapoison.py:paper \\
          --workdir /tmp/metapoison_paper --data_dir ~/.cache/jaxpoison/tfds

Differences from the paper, stated: ResNet-20 surrogates (the authors' published
poisons were crafted on ResNet-20; their default net is ConvNetBN); no ReColor
perturbation; poisons split into fixed chunks per metagradient batch (see
attacks/metapoison.py; the default puts all 10 in one batch of 125, 8% of it, where
the paper's random batches hold ~1%); Poison Frogs = the benchmark's l_inf variant in
the same eps-ball (120 iterations, 30% watermark); the default's sizes (1,000
images, M = 2, 10-16 craft steps, 20-epoch victims) are the CPU's, not the paper's.

Commands (need a tfds data dir with cifar10, e.g. ~/.cache/jaxpoison/tfds):
  python -m jaxpoison --config configs/metapoison.py --workdir /tmp/metapoison \\
      --data_dir ~/.cache/jaxpoison/tfds
  python -m jaxpoison --config configs/metapoison.py:runlocal \\
      --workdir /tmp/mp_local --data_dir ~/.cache/jaxpoison/tfds

Arguments: targets=N, poisons=N, seeds=N, craft_steps=N and surrogates=N (every
crafting run), seed=N, quickstart, paper,
runlocal (300 training images, 4 poisons, 2 surrogates fine-tuning from the
pretrained ResNet-20, K = 2, batch 20, 8 craft steps, 2 seeds, 3-epoch victims:
a small run of the whole pipeline);
runlocal,medium (500 training images, 5 poisons, batch 25, 10 craft steps, victims
of 4 (fine-tune) and 8 (scratch) epochs);
smoke (tests: the shipped CIFAR-10 sample, 100 training images, 2 poisons, 2
targets, 2 craft steps of K = 1 unrolled step, 1-epoch victims; K = 1 because
compilation is most of its time: `time python -m jaxpoison --config
configs/metapoison.py:smoke --workdir W` took 64 s at K = 1 and 88 s at K = 2).

The workdir holds each target's poisons as soon as they are crafted
(poisons/target_NNN.npz: MetaPoison's and Poison Frogs' poisons before 8-bit
rounding, and the crafting history), results.jsonl (one row per target, attack,
victim and seed), summary.json and craft_loss.png. Rerunning a killed run with the
same command loads the crafted targets and resumes at the first target whose
victims are not committed.

Second-order convolution gradients are slow on XLA:CPU (one K = 2 metagradient of
ResNet-20 at batch 125 took 9.6 s of CPU with other jobs on the 2 cores, a clean
epoch of 2,000 images at batch 125 (16 first-order steps) 8.7 s), so the quickstart
and paper sizes need an accelerator.

Measured on the 2-core CPU shared with other jobs (load ~10; one target):
  * runlocal: 7 min 6 s wall (2 min 29 s CPU user time). Ensemble CW loss 6.66 ->
    2.33 over 8 craft steps. Fine-tuned victims: MetaPoison 2/2 successes (target
    bird -> dog; 100% [34.2, 100]), CW margin -4.58, test accuracy 78.8%; Poison
    Frogs 0/2 (margin 1.50, 82.6%); clean bases 0/2 (margin 3.59, 82.4%). Victims
    from scratch (3 epochs on 300 images, ~18% test accuracy): 0/2 for all three.
  * runlocal,seeds=8: 15 min 4 s wall (5 min 8 s user); same poisons (crafting
    is deterministic). Fine-tuned: MetaPoison 8/8 = 100% [67.6, 100], CW margin
    -3.94, test accuracy 78.5%; Poison Frogs 1/8 = 12.5% [2.2, 47.1], margin 2.61,
    81.6%; clean bases 0/8 [0, 32.4], margin 4.61, 81.9%. From scratch (~17% test
    accuracy): MetaPoison 1/8, Frogs 1/8, clean 0/8.
  * runlocal,medium: 16 min 6 s wall (4 min 39 s user). CW loss 6.92 -> 0.52
    over 10 craft steps. Fine-tuned: 0/2 for all three, CW margin clean 11.58,
    Frogs 8.44, MetaPoison 2.18 (test accuracy 82.1 / 82.1 / 81.1%); from scratch
    (8 epochs): 0/2 for all three.
"""

import ml_collections

from jaxpoison.config_args import parse_arg


def get_config(arg=None):
    args = parse_arg(
        arg,
        targets=1,
        poisons=0,
        seeds=0,
        craft_steps=0,
        surrogates=0,
        seed=0,
        medium=False,
        quickstart=False,
        paper=False,
        smoke=False,
    )
    config = ml_collections.ConfigDict()
    config.experiment = "metapoison"
    config.model = "resnet20"
    config.weights = ""  # empty: the ResNet-20 shipped in the package
    config.dataset = "cifar10"  # or "cifar10_sample" (shipped, 30 per class)
    config.data_dir = ""  # empty: --data_dir flag, then $TFDS_DATA_DIR
    config.per_class = 500
    config.target_class = 2  # bird
    config.poison_class = 5  # dog
    config.target_id = 0
    config.num_targets = args["targets"]
    config.num_poisons = 50
    config.seeds = 8
    config.seed = args["seed"]
    config.test_images = 10_000
    config.poison_8bit = True
    config.log_every = 10
    config.craft = ml_collections.ConfigDict(
        dict(
            craft_steps=61,
            unroll_steps=2,
            surrogates=24,
            stagger=1,
            surrogate_init="scratch",
            epsilon=8 / 255,
            craft_rate=200 / 255,
            craft_rate_drops=(20, 40),
            craft_warmup=5,
            objective="cw",
            watermark=0.0,
            random_start=True,
            learning_rate=0.1,
            warmup_epochs=5,
            lr_milestones=(100, 150, 200),
            batch_size=125,
            poisons_per_batch=2,  # ~ 50 * 125 / 5000 per batch, as in the paper
            loop="python",
            remat=False,
            # The surrogates dealt over the devices (one per core on the CPU): on
            # 2 cores 1.37x faster craft steps than "loop", for ~8 s more
            # compilation (`python benchmarks/craft_ensemble.py`, README "Speed");
            # `small` sizes keep "loop".
            ensemble="devices",
        )
    )
    # Per victim kind, what its MetaPoison poisons change in `craft` (kinds with
    # the same settings share one crafting run); empty: one run for all.
    config.craft_for = ml_collections.ConfigDict()
    config.frogs = ml_collections.ConfigDict(
        dict(
            iterations=120,
            step_size=0.001,
            step_rule="benchmark",
            constraint="linf",
            epsilon=8 / 255,
            watermark=0.3,
        )
    )
    config.victims = ml_collections.ConfigDict(
        dict(
            scratch=dict(
                mode="end_to_end",
                optimizer="sgd",
                learning_rate=0.1,
                momentum=0.0,
                batch_size=125,
                epochs=200,
                lr_milestones=(100, 150),
            ),
            finetune=dict(
                mode="end_to_end",
                optimizer="sgd",
                learning_rate=0.01,
                momentum=0.9,
                batch_size=125,
                epochs=20,
            ),
        )
    )
    small = args["runlocal"] or args["smoke"]
    if args["paper"]:  # the paper's CIFAR-10 size, both settings
        config.per_class, config.num_poisons = 5000, 500  # 1% of the training set
        config.num_targets = args.local("targets", 10)
        config.craft_for = both_settings(config.craft)
    elif not (small or args["quickstart"]):  # the CPU default (module docstring)
        cpu_default(config)
        config.num_targets = args.local("targets", 2)
    if small:
        config.per_class = 30
        config.num_poisons = 4
        config.seeds = 2
        config.test_images = 300
        config.log_every = 2
        config.craft.update(
            craft_steps=8,
            surrogates=2,
            surrogate_init="pretrained",
            learning_rate=0.01,
            warmup_epochs=0,
            batch_size=20,
            poisons_per_batch=0,
            craft_rate_drops=(5, 7),
            craft_warmup=2,
            ensemble="loop",  # 8 craft steps: compilation outweighs the gain
        )
        config.frogs.iterations = 40
        config.victims.scratch.update(batch_size=50, epochs=3, lr_milestones=())
        config.victims.finetune.update(batch_size=50, epochs=3)
        if args["medium"]:  # runlocal,medium: a larger CPU run (see README)
            config.per_class, config.num_poisons, config.test_images = 50, 5, 500
            config.craft.update(craft_steps=10, batch_size=25, craft_rate_drops=(6, 9))
            config.frogs.iterations = 60
            config.victims.scratch.epochs = 8
            config.victims.finetune.epochs = 4
    if args["smoke"]:  # the whole pipeline in seconds, on the shipped sample
        config.dataset = "cifar10_sample"
        config.per_class, config.num_poisons, config.test_images = 10, 2, 20
        config.num_targets = args.local("targets", 2)
        config.craft.update(craft_steps=2, batch_size=10, unroll_steps=1)
        config.frogs.iterations = 2
        config.victims.scratch.update(epochs=1, batch_size=20)
        config.victims.finetune.update(epochs=1, batch_size=20)
    for name, key in (("poisons", "num_poisons"), ("seeds", "seeds")):
        if args[name]:
            config[key] = args[name]
    for name, key in (("craft_steps", "craft_steps"), ("surrogates", "surrogates")):
        if args[name]:  # every crafting run
            for craft in (config.craft, *config.craft_for.values()):
                if key in craft or craft is config.craft:
                    craft[key] = args[name]
    return config


def both_settings(craft) -> ml_collections.ConfigDict:
    del craft  # both start from it
    """MetaPoison's poisons per victim kind: surrogates fine-tuned from the
    pretrained ResNet-20 (lr 0.01, no warmup) for the fine-tuned victims, the
    paper's surrogates trained from scratch (`craft` as it is) for the others."""
    return ml_collections.ConfigDict(
        dict(
            finetune=dict(
                surrogate_init="pretrained",
                learning_rate=0.01,
                warmup_epochs=0,
            ),
            scratch=dict(surrogate_init="scratch"),
        )
    )


def cpu_default(config) -> None:
    """The default: both settings at the largest size that fits about an hour on
    the 2-core CPU (README "MetaPoison")."""
    config.per_class, config.num_poisons = 100, 10  # 1,000 images, 1% poisons
    config.seeds = 3
    config.test_images = 2000
    config.log_every = 2
    config.craft.update(
        surrogates=2,
        stagger=10,  # surrogates at epochs 0 and 10 of a 20-epoch period
        craft_steps=16,
        craft_rate_drops=(8, 12),
        craft_warmup=3,
        poisons_per_batch=0,  # the 10 poisons in one batch of 125
        lr_milestones=(),
    )
    config.craft_for = both_settings(config.craft)
    config.craft_for.finetune.update(craft_steps=10, craft_rate_drops=(5, 8))
    config.frogs.iterations = 120
    config.victims.scratch.update(epochs=20, lr_milestones=(10, 15))
    config.victims.finetune.update(epochs=5)
