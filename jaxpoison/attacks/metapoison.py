"""MetaPoison (Huang et al. 2020): poisons crafted through unrolled surrogate training.

Clean-label poisons x_p = b_p + delta_p (b_p base images of the poison class,
||delta_p||_inf <= eps = 8/255, pixels in [0, 1]) minimise the adversarial loss of a
target after K unrolled SGD steps of a surrogate on a batch that holds them
(Algorithm 1):

    theta_{k+1} = theta_k - lr * grad_theta L_train(batch_k(X_p); theta_k)
    L_adv = 1/K sum_{k=1..K} adv(f(x_t; theta_k), y_adv),
    delta <- Proj_eps(delta - Adam(grad_delta mean_m L_adv^m)),

averaged over an ensemble of M surrogates at staggered epochs (surrogate m starts at
epoch m * stagger), each of which trains one clean epoch between craft steps and
restarts from a fresh initialisation when it reaches epoch M * stagger. `adv` is the
Carlini-Wagner margin max(max_{j != a} z_j - z_a, -100) ("cw", the paper's default)
or the cross-entropy toward the adversarial class a ("xent").

Settings follow the authors' code (wronnyhuang/metapoison, parse.py/meta.py/main.py):
Adam craft rate 200 on the 0-255 scale (200/255 here), x0.1 at craft steps 20 and
40, squared warmup over 5 steps; random start uniform in the eps-ball; K = 2;
surrogate SGD lr 0.1 with a 5-epoch linear warmup and x0.1 at epochs 100/150/200;
batch 125; the poisons' batch and the K-1 following batches all carry the batch's
poisons, the gradient flowing through the first only (their stop_gradient);
optional 30% watermark of the target on the bases, the eps-ball then centred on the
watermarked base. Metagradients are summed over the batches that hold poisons and
averaged over surrogates.

Differences, stated: the poisons are split into fixed chunks of
`poisons_per_batch` (the paper's random batches hold a random number of them), and
each chunk's batch is filled with random clean rows; the target is scored in eval
mode with the BatchNorm statistics the unroll updated (the paper appends it to the
train-mode batch).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxpoison.attacks import unroll as U
from jaxpoison.errors import UserInputError
from jaxpoison.models import Model


@dataclasses.dataclass(frozen=True)
class MetaPoisonConfig:
    """Crafting settings (static). Defaults: the authors' code (see module doc).

    Attributes:
      craft_steps: outer (Adam) steps.
      unroll_steps: K, SGD steps unrolled per metagradient.
      surrogates: M, ensemble size.
      stagger: epochs between successive surrogates (T / M).
      surrogate_init: "scratch" (fresh initialisations, the paper's from-scratch
        setting) or "pretrained" (the given variables, the fine-tuning setting).
      epsilon: l_inf radius in [0, 1] pixels.
      craft_rate: Adam learning rate in [0, 1] pixel units.
      craft_rate_drops: craft steps at which the craft rate is multiplied by 0.1.
      craft_warmup: craft steps of squared warmup of the craft rate.
      objective: "cw" or "xent".
      cw_clamp: lower clamp of the CW margin.
      watermark: opacity of the target blended into the bases; 0 = none.
      random_start: start uniform in the eps-ball (else at the bases).
      learning_rate: surrogate SGD learning rate (trajectory and unroll).
      warmup_epochs: linear learning-rate warmup of the surrogates.
      lr_milestones: surrogate epochs at which the learning rate drops x0.1.
      batch_size: surrogate batch size.
      poisons_per_batch: poisons in each metagradient batch; 0 = all of them.
      loop: unroll loop, "python" or "scan" (attacks/unroll.py).
      remat: rematerialise unrolled steps.
      ensemble: "loop" (surrogates one after another from the host, each a jitted
        call: fastest on CPU), "vmap" or "map" (one program).
    """

    craft_steps: int = 61
    unroll_steps: int = 2
    surrogates: int = 24
    stagger: int = 1
    surrogate_init: str = "scratch"
    epsilon: float = 8 / 255
    craft_rate: float = 200 / 255
    craft_rate_drops: tuple[int, ...] = (20, 40)
    craft_warmup: int = 5
    objective: str = "cw"
    cw_clamp: float = -100.0
    watermark: float = 0.0
    random_start: bool = True
    learning_rate: float = 0.1
    warmup_epochs: int = 5
    lr_milestones: tuple[int, ...] = (100, 150, 200)
    batch_size: int = 125
    poisons_per_batch: int = 0
    loop: str = "python"
    remat: bool = False
    ensemble: str = "loop"

    def __post_init__(self):
        object.__setattr__(self, "craft_rate_drops", tuple(self.craft_rate_drops))
        object.__setattr__(self, "lr_milestones", tuple(self.lr_milestones))
        checks = {
            "objective": (self.objective, ("cw", "xent")),
            "surrogate_init": (self.surrogate_init, ("scratch", "pretrained")),
            "loop": (self.loop, U.LOOPS),
            "ensemble": (self.ensemble, ("loop", *U.ENSEMBLE)),
        }
        for name, (value, known) in checks.items():
            if value not in known:
                raise UserInputError(
                    f"unknown {name} {value!r}; known: {', '.join(known)}"
                )
        if min(self.unroll_steps, self.surrogates, self.stagger) < 1:
            raise UserInputError("unroll_steps, surrogates and stagger must be >= 1")
        if self.craft_steps < 0 or self.epsilon < 0 or self.batch_size < 2:
            raise UserInputError("craft_steps >= 0, epsilon >= 0, batch_size >= 2")
        if not 0.0 <= self.watermark < 1.0:
            raise UserInputError(f"watermark opacity {self.watermark} not in [0, 1)")


def adversarial_loss(logits, adv_labels, objective: str, clamp: float = -100.0):
    """Mean over targets of the CW margin or the cross-entropy toward `adv_labels`.

    CW (Carlini & Wagner 2017, as MetaPoison's `carlini`): max(max_{j != a} z_j -
    z_a, clamp); negative once the target is classified as a.
    """
    if objective == "xent":
        return optax.softmax_cross_entropy_with_integer_labels(
            logits, adv_labels
        ).mean()
    onehot = jax.nn.one_hot(adv_labels, logits.shape[-1], dtype=bool)
    z_adv = jnp.sum(jnp.where(onehot, logits, 0.0), axis=-1)
    z_other = jnp.max(jnp.where(onehot, -jnp.inf, logits), axis=-1)
    return jnp.maximum(z_other - z_adv, clamp).mean()


def project(delta, bases, epsilon):
    """delta into [-eps, eps], then so that bases + delta stays in [0, 1]."""
    delta = jnp.clip(delta, -epsilon, epsilon)
    return jnp.clip(bases + delta, 0.0, 1.0) - bases


def craft_rate(config: MetaPoisonConfig, step: int) -> float:
    """The authors' cr_schedule: squared warmup, x0.1 at each drop."""
    warm = 1.0
    if config.craft_warmup:
        warm = min(((step + 1) / config.craft_warmup) ** 2, 1.0)
    drops = sum(step >= d for d in config.craft_rate_drops)
    return config.craft_rate * warm * 0.1**drops


def surrogate_lr(config: MetaPoisonConfig, epoch: int) -> float:
    """The authors' lr_schedule: linear warmup over `warmup_epochs`, x0.1 drops."""
    warm = min(1.0, (epoch + 1) / (1e-6 + config.warmup_epochs))
    drops = sum(epoch >= m for m in config.lr_milestones)
    return config.learning_rate * warm * 0.1**drops


class CraftProblem(NamedTuple):
    """One crafting problem: bases (centres of the eps-ball), targets, labels.

    images/labels: the surrogates' clean training set (uint8, int). clean_rows: rows
    that may fill a poison batch (the training set without the bases' rows).
    """

    images: jax.Array
    labels: jax.Array
    clean_rows: jax.Array
    bases: jax.Array
    base_labels: jax.Array
    targets: jax.Array
    adv_labels: jax.Array


def chunking(num_poisons: int, config: MetaPoisonConfig) -> tuple[int, int]:
    """(chunks, poisons per chunk): fixed-shape poison batches."""
    per = config.poisons_per_batch or num_poisons
    per = min(per, num_poisons)
    if per >= config.batch_size:
        raise UserInputError(
            f"poisons_per_batch {per} must be below batch_size {config.batch_size}"
        )
    return math.ceil(num_poisons / per), per


def make_metagrad(model: Model, config: MetaPoisonConfig, per: int):
    """`metagrad(params, stats, poisons, valid, labels, fill_x, fill_y, target,
    adv, lr) -> (grad wrt poisons, L_adv)` for one surrogate and one poison chunk.

    `poisons` (per, H, W, C) in [0, 1]; `valid` (per,) masks padding rows;
    `fill_x` (K, B - per, H, W, C) float clean rows of the K batches.
    """
    tx_for = optax.sgd  # the unrolled step is theta - lr * grad (meta.py)
    apply = U.end_to_end_apply(model)

    def loss(poisons, params, stats, valid, labels, fill_x, fill_y, target, adv, lr):
        tx = tx_for(lr)
        step = U.make_step(apply, tx)
        k = fill_x.shape[0]
        first = jnp.arange(k) == 0

        def make_batch(xs):
            is_first, fx, fy = xs
            # The first batch's poisons carry the gradient; the later batches'
            # copies are constants (meta.py's stop_gradient for adapter steps > 0).
            p = jnp.where(is_first, poisons, jax.lax.stop_gradient(poisons))
            weights = jnp.concatenate([valid, jnp.ones(fy.shape, valid.dtype)])
            return U.Batch(
                jnp.concatenate([p, fx]), jnp.concatenate([labels, fy]), weights
            )

        def observe(learner):
            variables = U.variables_of(learner.params, learner.batch_stats)
            logits = model.apply(variables, target, train=False)[0]
            return adversarial_loss(logits, adv, config.objective, config.cw_clamp)

        learner = U.init_learner(params, stats, tx)
        _, out = U.unroll(
            step,
            learner,
            (first, fill_x, fill_y),
            make_batch,
            observe,
            loop=config.loop,
            remat=config.remat,
        )
        return out["observed"].mean()

    def metagrad(params, stats, poisons, *rest):
        value, grad = jax.value_and_grad(loss)(poisons, params, stats, *rest)
        return grad, value

    return metagrad


def make_surrogate_epoch(model: Model, config: MetaPoisonConfig, num_examples: int):
    """`epoch(params, stats, images, labels, key, lr) -> (params, stats, loss)`:
    one clean epoch of plain SGD (the paper's 'clean' trajectory, drop_last)."""
    steps = max(1, num_examples // config.batch_size)
    apply = U.end_to_end_apply(model)

    def epoch(params, stats, images, labels, key, lr):
        tx = optax.sgd(lr)
        perm = jax.random.permutation(key, num_examples)[: steps * config.batch_size]
        idx = perm.reshape(steps, config.batch_size)

        def make_batch(i):
            x = images[i].astype(jnp.float32) / 255.0
            return U.Batch(x, labels[i], jnp.ones(i.shape, jnp.float32))

        learner, out = U.unroll(
            U.make_step(apply, tx), U.init_learner(params, stats, tx), idx, make_batch
        )
        return learner.params, learner.batch_stats, out["loss"].mean()

    return epoch


class Surrogates(NamedTuple):
    """The ensemble: stacked variables (leading axis M) and each one's epoch."""

    params: object
    batch_stats: object
    epoch: np.ndarray


def craft(
    model: Model,
    variables,
    problem: CraftProblem,
    config: MetaPoisonConfig,
    key,
    log=None,
):
    """Crafts the poisons of one problem; returns (poisons, history).

    A host loop over craft steps (each a few jitted calls), so progress can be
    logged; `history` holds per craft step the ensemble's mean adversarial loss and
    the surrogates' epochs.
    """
    num = problem.bases.shape[0]
    chunks, per = chunking(num, config)
    n = problem.images.shape[0]
    m_total = config.surrogates
    period = m_total * config.stagger
    targets = jnp.asarray(problem.targets, jnp.float32)
    bases = jnp.asarray(problem.bases, jnp.float32)
    if config.watermark:  # meta.py: xbase = 0.7 xbase + 0.3 xtarget[0]
        bases = (1 - config.watermark) * bases + config.watermark * targets[:1]
    key, start_key = jax.random.split(key)
    delta = jnp.zeros_like(bases)
    if config.random_start:
        delta = jax.random.uniform(
            start_key, bases.shape, bases.dtype, -config.epsilon, config.epsilon
        )
    delta = project(delta, bases, config.epsilon)
    opt = optax.scale_by_adam()
    opt_state = opt.init(delta)

    metagrad = jax.jit(make_metagrad(model, config, per))
    if config.ensemble == "vmap":
        metagrad = jax.jit(
            jax.vmap(
                make_metagrad(model, config, per),
                in_axes=(0, 0, None, None, None, 0, 0, None, None, 0),
            )
        )
    elif config.ensemble == "map":
        metagrad = jax.jit(
            U.ensemble(
                make_metagrad(model, config, per),
                "map",
                in_axes=(0, 0, None, None, None, 0, 0, None, None, 0),
            )
        )
    epoch_fn = jax.jit(make_surrogate_epoch(model, config, n))
    images, labels = jnp.asarray(problem.images), jnp.asarray(problem.labels)

    def fresh(k):
        if config.surrogate_init == "pretrained":
            return variables["params"], variables.get("batch_stats", {})
        v = model.init(k)
        return v["params"], v.get("batch_stats", {})

    # Staggered pretraining: surrogate m trained clean to epoch m * stagger.
    members = []
    for m in range(m_total):
        key, init_key = jax.random.split(key)
        params, stats = fresh(init_key)
        for e in range(m * config.stagger):
            key, k = jax.random.split(key)
            params, stats, _ = epoch_fn(
                params, stats, images, labels, k, surrogate_lr(config, e)
            )
        members.append((params, stats, m * config.stagger))

    # Fixed-shape chunks: pad the poisons to chunks * per rows, padding weighted 0.
    pad = chunks * per - num
    valid = jnp.concatenate([jnp.ones(num), jnp.zeros(pad)]).reshape(chunks, per)
    base_labels = jnp.pad(jnp.asarray(problem.base_labels), (0, pad)).reshape(
        chunks, per
    )
    k_steps = config.unroll_steps
    fill = config.batch_size - per
    clean_rows = jnp.asarray(problem.clean_rows)
    if k_steps * fill > clean_rows.shape[0]:
        raise UserInputError(
            f"{k_steps} batches of {fill} clean rows need more than the "
            f"{clean_rows.shape[0]} clean training images"
        )
    adv = jnp.asarray(problem.adv_labels)
    history = []
    for s in range(config.craft_steps):
        poisons = jnp.pad(bases + delta, ((0, pad),) + ((0, 0),) * 3).reshape(
            chunks, per, *bases.shape[1:]
        )
        grad = jnp.zeros_like(poisons)
        losses = []
        lrs = [surrogate_lr(config, e) for _, _, e in members]
        fills = []
        for _ in range(m_total):
            per_chunk = []
            for _ in range(chunks):
                key, k = jax.random.split(key)
                rows = jax.random.permutation(k, clean_rows)[: k_steps * fill]
                per_chunk.append(rows.reshape(k_steps, fill))
            fills.append(per_chunk)
        for c in range(chunks):
            rows_c = jnp.stack([f[c] for f in fills])  # (M, K, fill)
            fx = images[rows_c].astype(jnp.float32) / 255.0
            fy = labels[rows_c]
            if config.ensemble == "loop":
                for m, (params, stats, _) in enumerate(members):
                    g, value = metagrad(
                        params,
                        stats,
                        poisons[c],
                        valid[c],
                        base_labels[c],
                        fx[m],
                        fy[m],
                        targets,
                        adv,
                        jnp.float32(lrs[m]),
                    )
                    grad = grad.at[c].add(g / m_total)
                    losses.append(value)
            else:
                stack = functools.partial(jax.tree.map, lambda *a: jnp.stack(a))
                g, value = metagrad(
                    stack(*[p for p, _, _ in members]),
                    stack(*[st for _, st, _ in members]),
                    poisons[c],
                    valid[c],
                    base_labels[c],
                    fx,
                    fy,
                    targets,
                    adv,
                    jnp.asarray(lrs, jnp.float32),
                )
                grad = grad.at[c].add(g.mean(0))
                losses.extend(list(value))
        grad = grad.reshape(-1, *bases.shape[1:])[:num]
        updates, opt_state = opt.update(grad, opt_state)
        delta = project(delta - craft_rate(config, s) * updates, bases, config.epsilon)
        mean_loss = float(np.mean([float(v) for v in losses]))
        history.append(
            {
                "craft_step": s,
                "adversarial_loss": mean_loss,
                "surrogate_epochs": [int(e) for _, _, e in members],
            }
        )
        if log is not None:
            log(history[-1])
        # Surrogates train one clean epoch; at the end of the period, start afresh.
        new = []
        for params, stats, e in members:
            key, k = jax.random.split(key)
            params, stats, _ = epoch_fn(
                params, stats, images, labels, k, surrogate_lr(config, e)
            )
            e += 1
            if e >= period:
                key, init_key = jax.random.split(key)
                (params, stats), e = fresh(init_key), 0
            new.append((params, stats, e))
        members = new
    return bases + delta, {"history": history, "centres": bases}
