"""Victim training's hyperparameters: `TrainConfig` and what follows from them.

A `TrainConfig` is static (hashable; changing a field recompiles). `schedule` turns
it and a training-set size into step counts, shared by the trainer and the feature
cache, which replays the trainer's batches (victims/features.py).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import Any, NamedTuple

from jaxpoison.errors import UserInputError
from jaxpoison.victims import loops

# Truong et al. Eq. 4-5 as printed; Hadsell et al. 2006's squared form.
CONTRASTIVE_FORMS = ("printed", "hadsell")


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Hyperparameters of victim training (static: changing one recompiles).

    Attributes:
      mode: "end_to_end" or "linear" (frozen feature extractor, head trained).
      cold_start_head: in linear mode, start the head from a fresh initialisation.
      optimizer: "sgd" (heavy-ball momentum, PyTorch semantics) or "adam".
      learning_rate: base learning rate.
      momentum: SGD momentum.
      nesterov: SGD Nesterov momentum.
      weight_decay: L2 added to the gradient (PyTorch `weight_decay`, coupled).
      epochs: passes over the training set.
      batch_size: examples per step.
      lr_milestones: epochs at which the learning rate is multiplied by `lr_decay`.
      lr_decay: the factor for `lr_milestones`.
      augment: random crop (zero padding `crop_padding`) and horizontal flip.
      crop_padding: pixels of zero padding for the random crop.
      cache_augmented_features: linear mode with augmentation: compute the frozen
        features of every crop/flip outcome of the clean images once (162 per image
        for padding 4), and of each poison the outcomes its epochs will draw (one
        per epoch, replayed from the key), and look them up in each step; the same
        victim as running the extractor per step (see victims/augment.py), much
        faster over many epochs or trials.
      box_loss_weight: weight of the L1 box loss for models with a box head
        (1/1000 in the road-sign studies).
      max_steps: stop after this many steps (an unrolled prefix); None = all.
      loop: "scan", "step" (host loop of jitted steps), "epoch" (host loop of
        jitted epochs) or "auto" (see `loops.choose`).
      remat: rematerialise each step under `jax.checkpoint` (long unrolls).
      split_batch: a single end-to-end training on CPU (`train` outside any trace)
        splits each batch over the local devices when there are several
        (victims/data_parallel.py); False keeps it on one device.
      logit_squeeze: weight of the logit-squeezing term (victims/regularizers.py;
        Truong et al. 2020 Sec. 3.4); 0 = off. Likewise:
      mixup: weight of the manifold-mixup cross-entropy on penultimate features.
      contrastive: weight of the contrastive loss, with margin
        `contrastive_margin`, in the form `contrastive_form`: "printed" (Truong
        et al. Eq. 4-5 as printed: unsquared distances, weights 1/n and (n-1)/n,
        n the number of classes) or "hadsell" (Hadsell et al. 2006's squared form).
      snn: weight of the soft-nearest-neighbour loss (Truong et al. Eq. 6), at
        temperature `snn_temperature` (a negative weight is Frosst et al.'s
        entangling variant). Contrastive and SNN act on the penultimate
        features: in linear mode those are frozen and the terms add a constant.
      dp_clip_norm: DP-SGD-style defence (Hong et al. 2020): clip each example's
        gradient to this l2 norm (jaxpoison/defences/training.py); 0 = off.
        Per-example gradients need examples that do not interact: end to end,
        BatchNorm then runs on its running statistics and is not updated.
      dp_noise_multiplier: with `dp_clip_norm`, Gaussian noise of standard
        deviation `dp_noise_multiplier * dp_clip_norm` on the summed clipped
        gradients (Abadi et al. 2016, Alg. 1).
      input_mixup: input mixup (Zhang et al. 2018) with lam ~ Beta(a, a) for this
        a; 0 = off. Unlike `mixup` (manifold mixup of features, a regulariser),
        it mixes the images and replaces the loss.
      cutout: side in pixels of the cutout square (DeVries & Taylor 2017); 0 = off.
      Input mixup and cutout change the images, so a linear victim runs its frozen
      extractor on every batch instead of looking features up.
    """

    mode: str = "end_to_end"
    cold_start_head: bool = False
    optimizer: str = "sgd"
    learning_rate: float = 0.01
    momentum: float = 0.9
    nesterov: bool = False
    weight_decay: float = 0.0
    epochs: int = 1
    batch_size: int = 128
    lr_milestones: tuple[int, ...] = ()
    lr_decay: float = 0.1
    augment: bool = False
    cache_augmented_features: bool = False
    crop_padding: int = 4
    box_loss_weight: float = 1e-3
    max_steps: int | None = None
    loop: str = "auto"
    remat: bool = False
    split_batch: bool = True
    logit_squeeze: float = 0.0
    mixup: float = 0.0
    contrastive: float = 0.0
    contrastive_margin: float = 1.0
    contrastive_form: str = "printed"
    snn: float = 0.0
    snn_temperature: float = 1.0
    dp_clip_norm: float = 0.0
    dp_noise_multiplier: float = 0.0
    input_mixup: float = 0.0
    cutout: int = 0

    def __post_init__(self):
        if self.mode not in ("end_to_end", "linear"):
            raise UserInputError(
                f"unknown training mode {self.mode!r}: end_to_end, linear"
            )
        if self.optimizer not in ("sgd", "adam"):
            raise UserInputError(f"unknown optimizer {self.optimizer!r}: sgd, adam")
        if self.loop not in loops.LOOPS:
            raise UserInputError(
                f"unknown loop {self.loop!r}: {', '.join(loops.LOOPS)}"
            )
        if self.batch_size < 1 or self.epochs < 0:
            raise UserInputError("batch_size must be >= 1 and epochs >= 0")
        if self.contrastive_form not in CONTRASTIVE_FORMS:
            raise UserInputError(
                f"unknown contrastive_form {self.contrastive_form!r}: "
                + ", ".join(CONTRASTIVE_FORMS)
            )
        if self.contrastive_margin <= 0 or self.snn_temperature <= 0:
            raise UserInputError("contrastive_margin and snn_temperature must be > 0")
        if min(self.dp_clip_norm, self.dp_noise_multiplier) < 0:
            raise UserInputError("dp_clip_norm and dp_noise_multiplier must be >= 0")
        if self.dp_noise_multiplier and not self.dp_clip_norm:
            raise UserInputError("dp_noise_multiplier needs dp_clip_norm > 0")
        if self.dp_clip_norm and uses_regularizers(self):
            raise UserInputError(
                "dp_clip_norm clips per-example gradients of the cross-entropy; "
                "it does not combine with a regulariser (logit_squeeze, mixup, "
                "contrastive, snn)"
            )
        if self.input_mixup < 0 or self.cutout < 0:
            raise UserInputError("input_mixup and cutout must be >= 0")
        object.__setattr__(self, "lr_milestones", tuple(self.lr_milestones))

    @classmethod
    def from_mapping(cls, values: Mapping[str, Any]) -> TrainConfig:
        """From a dict or ConfigDict; an unknown key is a one-line UserInputError."""
        values = dict(values.items())
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - names)
        if unknown:
            raise UserInputError(
                f"unknown training option(s) {', '.join(unknown)}; "
                f"known: {', '.join(sorted(names))}"
            )
        return cls(**values)


def uses_regularizers(config: TrainConfig) -> bool:
    """Whether any of Truong et al.'s regularisers is on (static)."""
    return bool(
        config.logit_squeeze or config.mixup or config.contrastive or config.snn
    )


def uses_cached_features(config: TrainConfig) -> bool:
    """Linear victims train on cached features (per crop/flip when augmenting)."""
    return (
        config.mode == "linear"
        and (not config.augment or config.cache_augmented_features)
        and not changes_images(config)
    )


def changes_images(config: TrainConfig) -> bool:
    """Whether a training-time defence alters each batch's images (input mixup,
    cutout), so frozen features cannot be cached (static)."""
    return bool(config.input_mixup or config.cutout)


class Schedule(NamedTuple):
    """Step counts of one training run.

    Attributes:
      steps_per_epoch: batches per pass (the last one padded with zero weights).
      epochs: passes actually run (`max_steps` may cut the last one short).
      total_steps: steps that change the state; later steps are no-ops.
    """

    steps_per_epoch: int
    epochs: int
    total_steps: int


def schedule(config: TrainConfig, num_examples: int) -> Schedule:
    """The `Schedule` of training `num_examples` examples under `config`."""
    steps_per_epoch = max(1, math.ceil(num_examples / config.batch_size))
    total_steps = config.epochs * steps_per_epoch
    if config.max_steps is not None:
        total_steps = min(total_steps, config.max_steps)
    return Schedule(
        steps_per_epoch, math.ceil(total_steps / steps_per_epoch), total_steps
    )
