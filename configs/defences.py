"""Every attack x every defence, one resumable sweep per attack (issue 17, item 3).

Attacks (`config.attacks`, registry in jaxpoison/experiments/poisonings.py):
* feature_collision: the poisoning benchmark's CIFAR-10 transfer setups
  (Schwarzschild et al. 2021), poisons crafted as frogs_benchmark does (watermark
  0.3, 8/255 l_inf ball, 8-bit), victim = a fresh linear head on the frozen
  ResNet-20 (CIFAR-10 weights shipped; the benchmark's white-box extractor is a
  CIFAR-100 ResNet-18), first `per_class` training images per class; success =
  the target classified as the base class.
* convex_polytope / bullseye_polytope: the same setups, victims and sizes, poisons
  crafted white-box as the benchmark's craft_poisons_{cp,bp}.py (Zhu et al. 2019;
  Aghakhani et al. 2021; attacks/polytope.py: 1200 Adam steps of lr 0.04 in the
  normalised coordinates, poisons from the bases, 8/255 ball, 8-bit).
* gradient_matching: Witches' Brew (Geiping et al. 2021) on the benchmark's
  from-scratch setups, as configs/gradient_matching.py at the same size (its
  config is this entry: convnet_small surrogate and victims trained from scratch,
  8 setups, 5,000 training images, 50 poisons, eps 8/255, M = 250, R = 4, 20
  epochs); one victim per setup and defence, every setup's victim from the same
  initialisation (the grid's seed).
* badnets / blend: a trigger (BadNets' black square at alpha 1 / Truong et al.'s
  sine blended at alpha `blend_alpha`) on source images supplanting rows of the
  poison class (Truong et al. 2020, Eq. 7-9) at rate lambda, a ResNet-20
  fine-tuned end to end from the shipped weights; success = the attack success
  rate on the triggered test images of the other classes.

Defences (jaxpoison/defences/), each on the same poisons:
* none;
* filters, then retraining on what they keep: spectral signatures (Tran et al.
  2018: remove the 1.5 x epsilon top scores per class, epsilon = the poisons per
  trial), activation clustering (Chen et al. 2018: 10 whitened principal
  components (= ICA up to a rotation), 2-means per class, remove the smaller
  cluster if it holds <= 35% of its class, ART's relative size), deep k-NN (Peri
  et al. 2020: k = 2 x the poisons per trial, as forest reads the paper). A linear
  victim's filters read the frozen features; an end-to-end victim's, the
  penultimate features of the undefended victim trained on the poisoned set;
* training-time: DP-SGD-style per-example clipping (C = 1) and noise (sigma =
  `dp_noise`) (Hong et al. 2020), input mixup (alpha 1, Zhang et al. 2018) and
  cutout (16 px, DeVries & Taylor 2017), the strong augmentations of Borgnia et
  al. 2021.

Outputs: results.jsonl (a row per trial and defence: success or attack success
rate, clean accuracy, poison recall and clean rows removed), summary.json (the
attack x defence table), tables.md, success_vs_accuracy.png; `python -m
jaxpoison.report DIR` reads it like any workdir.

Command (the CIFAR-10 tfds data dir):
  python -m jaxpoison --config configs/defences.py:runlocal --workdir /tmp/defences \\
      --data_dir ~/.cache/jaxpoison/tfds
  python -m jaxpoison --config configs/defences.py --workdir /tmp/defences_full \\
      --data_dir ~/.cache/jaxpoison/tfds

Arguments: setups=N (feature collision and the polytopes), seeds=N (backdoors),
examples=N (backdoor training images), epochs=N (backdoor victims), attacks=a+b (a
subset of feature_collision, convex_polytope, bullseye_polytope,
gradient_matching, badnets, blend), dp_noise=X, seed=N, runlocal, smoke.

Default size: 100 setups with the benchmark's victim (250 per class, 40 epochs,
crop/flip augmentation; mixup and cutout then run the extractor on every batch),
backdoors on 10,000 training images, 5 seeds, 20 epochs. Not run on this machine (a
GPU box's job). `runlocal`: 4 FC setups (100 per class, 30 crafting steps, 10
epochs, no augmentation), backdoors on 1,000 images (21 poisons), 2 seeds, 4 epochs
at batch 32: 37 min 26 s wall on the 2-core CPU with other jobs keeping the load
near 12 (11 CPU-min), before the polytopes and gradient matching joined (their
runlocal rows:
`runlocal,attacks=convex_polytope+bullseye_polytope+gradient_matching`, timed in
README); with all six attacks, 27 min 55 s wall, 48 CPU-min on an idle 2-core Intel
machine (`python benchmarks/experiment_times.py --variants ours --experiments
defences --timeout 1800`, 2026-12-03); its table is in README "Defences" (BadNets
ASR 38% undefended, 10% after spectral signatures, 4% under DP-SGD; feature
collision fails undefended at this size, 0/4). The polytopes' `runlocal`: FC's
runlocal setups and victims, 100 crafting steps (benchmark_transfer's runlocal);
gradient matching's: configs/gradient_matching.py:runlocal (4 setups, 1,000 images,
10 poisons, 60 steps, 2 restarts, 10 epochs). `smoke` (tests): the shipped CIFAR-10
sample for the backdoors, 2 FC / CP / BP setups of 2 crafting steps on 30 images per
class, gradient matching's smoke (2 setups, 200 images, 2 poisons, 2 steps), 1 epoch
everywhere.
"""

import importlib.util
import os

import ml_collections

from jaxpoison.config_args import parse_arg
from jaxpoison.defences.grid import default_settings

ATTACKS = (
    "feature_collision",
    "convex_polytope",
    "bullseye_polytope",
    "gradient_matching",
    "badnets",
    "blend",
)
# Crafting steps of the polytope attacks per size (benchmark_transfer's: the
# benchmark's 1200; its runlocal's 100). Every other setting: PolytopeConfig's
# defaults, the benchmark's craft_poisons_{cp,bp}.py.
POLYTOPE_ITERATIONS = {"default": 1200, "runlocal": 100, "smoke": 2}


def sibling_config(name: str, arg: str):
    """configs/<name>.py's config for `arg` (configs are files, loaded by path)."""
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), f"{name}.py")
    spec = importlib.util.spec_from_file_location(f"_defences_{name}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(arg)


def get_config(arg=None):
    args = parse_arg(
        arg,
        setups=100,
        seeds=5,
        examples=10000,
        epochs=20,
        attacks="+".join(ATTACKS),
        dp_noise=0.01,
        blend_alpha=0.2,
        seed=0,
        smoke=False,
    )
    config = ml_collections.ConfigDict()
    config.experiment = "defences"
    config.data_dir = ""  # --data_dir flag, then $TFDS_DATA_DIR
    config.seed = args["seed"]
    config.cpu_devices = 0  # one JAX device per core; trials split over them
    config.chunk_size = 4
    defaults = default_settings(dp_noise=args["dp_noise"])
    config.defences = defaults["defences"]
    config.filters = ml_collections.ConfigDict(defaults["filters"])
    config.training = ml_collections.ConfigDict(defaults["training"])
    fc = dict(
        kind="transfer",
        crafter="feature_collision",
        model="resnet20",
        weights="",  # empty: the shipped CIFAR-10 ResNet-20
        setups_file="",  # empty: the benchmark's setups shipped in the package
        setups=args["setups"],
        per_class=250,
        test_examples=0,  # 0: the whole test set
        chunk_size=10,
        craft=dict(
            iterations=120,
            step_size=0.001,
            step_rule="benchmark",
            constraint="linf",
            epsilon=8 / 255,
            watermark=0.3,
        ),
        victim=dict(
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
        ),
    )
    backdoor = dict(
        kind="backdoor",
        dataset="cifar10",
        model="resnet20",
        init="pretrained",  # the shipped CIFAR-10 weights, fine-tuned end to end
        trigger="black_square",
        alpha=1.0,
        sine_reference_width=224,
        poison_class=0,
        rate=0.1,  # Truong et al.'s lambda: 10% of the poison class supplanted
        examples=args["examples"],
        test_examples=2000,
        seeds=args["seeds"],
        chunk_size=1,
        victim=dict(
            mode="end_to_end",
            optimizer="sgd",
            learning_rate=0.01,
            momentum=0.9,
            weight_decay=5e-4,
            batch_size=64,
            epochs=args["epochs"],
        ),
    )
    blend = dict(backdoor, trigger="sine", alpha=args["blend_alpha"])
    if args["runlocal"]:
        fc.update(
            setups=args.local("setups", 4),
            per_class=100,
            chunk_size=4,
            test_examples=1000,
        )
        fc["craft"]["iterations"] = 30
        fc["victim"].update(
            epochs=10,
            lr_milestones=(8,),
            augment=False,
            cache_augmented_features=False,
        )
        for b in (backdoor, blend):
            b.update(
                examples=args.local("examples", 1000),
                test_examples=500,
                seeds=args.local("seeds", 2),
                rate=0.2,
                chunk_size=2,
            )
            b["victim"].update(epochs=args.local("epochs", 4), batch_size=32)
    if args["smoke"]:  # the CLI test: seconds per sweep
        fc.update(
            setups=args.local("setups", 2),
            per_class=30,
            chunk_size=2,
            test_examples=100,
        )
        fc["craft"]["iterations"] = 2
        fc["victim"].update(
            epochs=1,
            lr_milestones=(),
            augment=False,
            cache_augmented_features=False,
            batch_size=64,
        )
        for b in (backdoor, blend):
            b.update(
                dataset="cifar10_sample",
                examples=args.local("examples", 200),
                test_examples=50,
                seeds=args.local("seeds", 1),
                rate=0.3,
                chunk_size=1,
            )
            b["victim"].update(epochs=args.local("epochs", 1), batch_size=32)
    size = "smoke" if args["smoke"] else "runlocal" if args["runlocal"] else "default"
    # Convex / bullseye polytope: feature collision's setups, victims and sizes
    # (made after the size blocks above), white-box crafting as the benchmark's.
    polytopes = {
        name: dict(
            fc,
            crafter=name,
            chunk_size=min(fc["chunk_size"], 4),
            craft=dict(iterations=POLYTOPE_ITERATIONS[size]),
        )
        for name in ("convex_polytope", "bullseye_polytope")
    }
    # Gradient matching: configs/gradient_matching.py's config at the same size.
    gm = sibling_config(
        "gradient_matching",
        f"seed={args['seed']}" + ("" if size == "default" else f",{size}"),
    ).to_dict()
    for key in ("experiment", "cpu_devices"):
        gm.pop(key)
    gm["kind"] = "gradient_matching"
    every = dict(
        feature_collision=fc,
        **polytopes,
        gradient_matching=gm,
        badnets=backdoor,
        blend=blend,
    )
    names = [a for a in args["attacks"].split("+") if a]
    unknown = [a for a in names if a not in every]
    if unknown:
        from jaxpoison.errors import UserInputError

        raise UserInputError(
            f"unknown attack {unknown[0]!r}; known: {', '.join(ATTACKS)}"
        )
    config.attacks = ml_collections.ConfigDict({a: every[a] for a in names})
    return config
