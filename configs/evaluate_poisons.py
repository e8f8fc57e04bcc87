"""Poisons from elsewhere against our victims and defences (issue 17, item 4).

The command line's `jaxpoison evaluate-poisons DIR`:

  python -m jaxpoison --config configs/evaluate_poisons.py:poisons_dir=DIR \\
      --workdir /tmp/eval --data_dir ~/.cache/jaxpoison/tfds

`DIR` holds poisons in the poisoning benchmark's format (Schwarzschild et al.
2021, aks2203/poisoning-benchmark): one folder per setup with poisons.pickle (a
list of (PIL image, label)), base_indices.pickle (the CIFAR-10 training rows the
poisons replace) and target.pickle ((PIL image, label), or with a backdoor's
patch and its (x, y) corner, which is pasted on the target as the benchmark's
poison_test.py does), or DIR is one such folder. The benchmark's own
craft_poisons_*.py and forest's `--save benchmark` write this; so does
`frogs_benchmark` (its `benchmark_format/` folder).

Each setup is a trial; its victim (`protocol`):
* "transfer" (default): the benchmark's transfer-learning test (poison_test.py
  with --ffe): a fresh linear head on the frozen extractor (`model`, `weights`;
  the shipped CIFAR-10 ResNet-20 unless `weights` names another), trained on the
  first `per_class` CIFAR-10 training images per class without the bases, plus the
  poisons (SGD momentum 0.9, lr 0.01, weight decay 2e-4, batch 128, 40 epochs, lr
  x0.1 at 30, crop/flip: the benchmark's defaults);
* "from_scratch": `model` trained end to end from `init` on the training set
  (`examples` > 0: a seeded subset holding every base).
Every defence of `defences` runs on each (the defences grid's; see
configs/defences.py). Success: the target classified as the poisons' label.
Outputs as configs/defences.py's: results.jsonl, summary.json, tables.md,
success_vs_accuracy.png.

Arguments: poisons_dir=DIR, protocol=transfer|from_scratch, setups=N (the first
N folders; 0 = all), epochs=N (0: the protocol's), runlocal (10 epochs, no
augmentation, 1000 test images), smoke (tests: frogs_benchmark's smoke victims,
30 images per class, 1 epoch; 100 test images).
"""

import ml_collections

from jaxpoison.config_args import parse_arg
from jaxpoison.defences.grid import default_settings


def get_config(arg=None):
    args = parse_arg(
        arg,
        poisons_dir="",
        protocol="transfer",
        setups=0,
        epochs=0,
        seed=0,
        smoke=False,
    )
    config = ml_collections.ConfigDict()
    config.experiment = "evaluate_poisons"
    config.data_dir = ""
    config.poisons_dir = args["poisons_dir"]
    config.protocol = args["protocol"]
    config.setups = args["setups"]
    config.seed = args["seed"]
    config.cpu_devices = 0
    config.chunk_size = 10
    config.model = "resnet20"
    config.weights = ""  # empty: the shipped CIFAR-10 ResNet-20
    config.init = "scratch"  # from_scratch: a fresh network
    config.per_class = 250
    config.examples = 0  # from_scratch: 0 = the whole training set
    config.test_examples = 0  # 0 = the whole test set
    defaults = default_settings(dp_noise=0.01)
    config.defences = defaults["defences"]
    config.filters = ml_collections.ConfigDict(defaults["filters"])
    config.training = ml_collections.ConfigDict(defaults["training"])
    transfer = args["protocol"] == "transfer"
    # The benchmark's defaults (learning_module.set_defaults): transfer 40 epochs
    # at lr 0.01 (x0.1 at 30); from scratch 200 epochs at lr 0.1 (x0.1 at 100, 150).
    epochs = args["epochs"] or (40 if transfer else 200)
    config.victim = ml_collections.ConfigDict(
        dict(
            mode="linear" if transfer else "end_to_end",
            cold_start_head=transfer,
            optimizer="sgd",
            learning_rate=0.01 if transfer else 0.1,
            momentum=0.9,
            weight_decay=2e-4,
            batch_size=128,
            epochs=epochs,
            lr_milestones=(30,) if transfer else (100, 150),
            augment=True,
            cache_augmented_features=transfer,
        )
    )
    if args["runlocal"]:
        config.victim.epochs = args["epochs"] or 10
        config.victim.lr_milestones = (8,) if transfer else ()
        config.victim.augment = False
        config.victim.cache_augmented_features = False
        config.test_examples = 1000
        config.examples = 2000
    if args["smoke"]:
        config.per_class = 30
        config.victim.epochs = args["epochs"] or 1
        config.victim.lr_milestones = ()
        config.victim.augment = False
        config.victim.cache_augmented_features = False
        config.test_examples = 100
        config.examples = 300
        config.chunk_size = 2
    return config
