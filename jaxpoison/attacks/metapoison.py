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
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from jaxpoison.attacks import unroll as U
from jaxpoison.errors import UserInputError
from jaxpoison.models import Model
from jaxpoison.sweep.sharding import TRIALS, per_device, trial_mesh


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
        call: fastest on one CPU device), "devices" (the surrogates dealt over the
        local devices, each running its share in sequence: one program for the
        metagradients, one for the clean epochs; fastest on a CPU split into one
        device per core, and on several accelerators), "vmap" or "map" (one
        program on one device).
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
            "ensemble": (self.ensemble, ("loop", "devices", *U.ENSEMBLE)),
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
    epoch: np.ndarray  # (M,) host ints: they choose learning rates and restarts


class MetaPoisonState(NamedTuple):
    """Crafting state of one problem (Huang et al. 2020, Alg. 1).

    delta: the perturbation of the centres (P, H, W, C), poisons = centres + delta;
    opt_state: Adam's moments of delta; surrogates: the staggered ensemble; key:
    the crafting stream, split in a fixed order (so the poisons follow from the
    initial key alone); step: craft steps taken (the craft-rate schedule's clock).
    """

    delta: jax.Array
    opt_state: optax.OptState
    surrogates: Surrogates
    key: jax.Array
    step: int


# Adam's direction only: the craft rate and its schedule scale it in `step`.
ADAM = optax.scale_by_adam()
# Surrogate axes of the ensemble's metagradient: params, stats, fill rows, lr.
ENSEMBLE_AXES = (0, 0, None, None, None, 0, 0, None, None, 0)
# ... and of a clean epoch: params, stats, the epoch's key and lr.
EPOCH_AXES = (0, 0, None, None, 0, 0)


def centres(problem: CraftProblem, config: MetaPoisonConfig) -> jax.Array:
    """Centres of the eps-ball: the bases, watermarked with the target if asked
    (meta.py: xbase = 0.7 xbase + 0.3 xtarget[0])."""
    bases = jnp.asarray(problem.bases, jnp.float32)
    if config.watermark:
        targets = jnp.asarray(problem.targets, jnp.float32)
        bases = (1 - config.watermark) * bases + config.watermark * targets[:1]
    return bases


def member_mesh(surrogates: int) -> Mesh:
    """A 1-D mesh over as many local devices as there are surrogates, at most."""
    devices = jax.local_devices()
    return trial_mesh(devices[: min(len(devices), surrogates)])


def over_devices(fn, in_axes: tuple, mesh: Mesh):
    """`fn` over stacked surrogates (leading axis), each device of `mesh` running
    its own share in sequence (`lax.map`), jitted: surrogates never communicate, so
    each device's programme is one surrogate's, looped.

    A surrogate count the mesh does not divide is padded with copies of the last
    surrogate, whose results are dropped. Every call puts its arguments on the
    mesh first (per-surrogate ones split, the rest replicated), so that the input
    shardings, and with them the compiled program, are the same at every call."""
    mapped = U.ensemble(fn, "map", in_axes=in_axes)
    jitted = jax.jit(per_device(mapped, mesh, [axis == 0 for axis in in_axes]))
    split, whole = NamedSharding(mesh, P(TRIALS)), NamedSharding(mesh, P())

    def call(*args):
        per = [a for a, axis in zip(args, in_axes, strict=True) if axis == 0]
        m = jax.tree.leaves(per)[0].shape[0]
        extra = -m % mesh.size

        def pad(a):
            return jnp.concatenate([a, jnp.repeat(a[-1:], extra, axis=0)])

        placed = [
            jax.device_put(jax.tree.map(pad, a), split)
            if axis == 0
            else jax.device_put(a, whole)
            for a, axis in zip(args, in_axes, strict=True)
        ]
        return jax.tree.map(lambda out: out[:m], jitted(*placed))

    return call


@functools.lru_cache(maxsize=16)
def _programs(model: Model, config: MetaPoisonConfig, num_examples: int, per: int):
    """(metagrad, epoch), jitted once per model, config and problem shape."""
    metagrad = make_metagrad(model, config, per)
    epoch = make_surrogate_epoch(model, config, num_examples)
    if config.ensemble == "devices":
        mesh = member_mesh(config.surrogates)
        return over_devices(metagrad, ENSEMBLE_AXES, mesh), over_devices(
            epoch, EPOCH_AXES, mesh
        )
    if config.ensemble != "loop":
        metagrad = U.ensemble(metagrad, config.ensemble, in_axes=ENSEMBLE_AXES)
    return jax.jit(metagrad), jax.jit(epoch)


def _fresh(model: Model, variables, config: MetaPoisonConfig, key):
    """A restarted surrogate: a fresh initialisation, or the given variables."""
    if config.surrogate_init == "pretrained":
        return variables["params"], variables.get("batch_stats", {})
    v = model.init(key)
    return v["params"], v.get("batch_stats", {})


def _stack(members) -> Surrogates:
    stack = functools.partial(jax.tree.map, lambda *a: jnp.stack(a))
    return Surrogates(
        stack(*[p for p, _, _ in members]),
        stack(*[s for _, s, _ in members]),
        np.array([e for _, _, e in members], np.int64),
    )


def _members(surrogates: Surrogates) -> list[tuple]:
    take = lambda tree, m: jax.tree.map(lambda x: x[m], tree)  # noqa: E731
    return [
        (take(surrogates.params, m), take(surrogates.batch_stats, m), int(e))
        for m, e in enumerate(surrogates.epoch)
    ]


def _check_problem(problem: CraftProblem, config: MetaPoisonConfig) -> int:
    """Poisons per chunk; an error if the clean rows cannot fill K batches."""
    _, per = chunking(problem.bases.shape[0], config)
    fill = config.batch_size - per
    clean = problem.clean_rows.shape[0]
    if config.unroll_steps * fill > clean:
        raise UserInputError(
            f"{config.unroll_steps} batches of {fill} clean rows need more than the "
            f"{clean} clean training images"
        )
    return per


def init(
    model: Model, variables, problem: CraftProblem, config: MetaPoisonConfig, key
) -> MetaPoisonState:
    """Random start in the eps-ball; surrogate m trained clean to epoch m * stagger."""
    per = _check_problem(problem, config)
    bases = centres(problem, config)
    key, start_key = jax.random.split(key)
    delta = jnp.zeros_like(bases)
    if config.random_start:
        delta = jax.random.uniform(
            start_key, bases.shape, bases.dtype, -config.epsilon, config.epsilon
        )
    delta = project(delta, bases, config.epsilon)
    _, epoch_fn = _programs(model, config, problem.images.shape[0], per)
    images, labels = jnp.asarray(problem.images), jnp.asarray(problem.labels)
    fresh, plans = [], []
    for m in range(config.surrogates):
        key, init_key = jax.random.split(key)
        fresh.append(_fresh(model, variables, config, init_key))
        plans.append([])
        for e in range(m * config.stagger):
            key, k = jax.random.split(key)
            plans[-1].append((k, surrogate_lr(config, e)))
    trained = run_epochs(epoch_fn, config, fresh, plans, images, labels)
    members = [(*t, m * config.stagger) for m, t in enumerate(trained)]
    return MetaPoisonState(delta, ADAM.init(delta), _stack(members), key, 0)


def _fill_rows(key, clean_rows, config: MetaPoisonConfig, chunks: int, fill: int):
    """Clean rows filling each surrogate's K batches, per chunk: (chunks, M, K, fill).

    Drawn surrogate by surrogate, chunk by chunk, each from its own split of `key`.
    """
    k_steps = config.unroll_steps
    rows = []
    for _ in range(config.surrogates * chunks):
        key, k = jax.random.split(key)
        rows.append(jax.random.permutation(k, clean_rows)[: k_steps * fill])
    rows = jnp.stack(rows).reshape(config.surrogates, chunks, k_steps, fill)
    return key, jnp.swapaxes(rows, 0, 1)


def _ensemble_metagrad(metagrad, config, surrogates, members, lrs, chunk, rest):
    """One chunk's metagradient averaged over the ensemble, and each L_adv.

    `chunk` = (poisons, valid, labels) of the chunk; `rest` = (fill images (M, K,
    ...), fill labels, targets, adversarial labels).
    """
    fx, fy, targets, adv = rest
    if config.ensemble != "loop":
        g, value = metagrad(
            surrogates.params,
            surrogates.batch_stats,
            *chunk,
            fx,
            fy,
            targets,
            adv,
            jnp.asarray(lrs, jnp.float32),
        )
        return g.mean(0), list(value)
    grad, losses = jnp.zeros_like(chunk[0]), []
    for m, (params, stats, _) in enumerate(members):
        g, value = metagrad(
            params, stats, *chunk, fx[m], fy[m], targets, adv, jnp.float32(lrs[m])
        )
        grad = grad + g / config.surrogates
        losses.append(value)
    return grad, losses


def run_epochs(epoch_fn, config, members, plans, images, labels) -> list[tuple]:
    """Each surrogate's planned clean epochs, in order: members[m] = (params, stats)
    trains one epoch per (key, lr) of plans[m]. Returns the [(params, stats)].

    `ensemble="devices"` runs them in rounds, every surrogate at once (one epoch each
    round, over the devices); a surrogate with fewer epochs left keeps its variables.
    Otherwise surrogate after surrogate, one jitted epoch at a time.
    """
    if config.ensemble != "devices":
        out = []
        for (params, stats), plan in zip(members, plans, strict=True):
            for k, lr in plan:
                params, stats, _ = epoch_fn(params, stats, images, labels, k, lr)
            out.append((params, stats))
        return out
    m = len(members)
    stacked = _stack([(p, s, 0) for p, s in members])
    params, stats = stacked.params, stacked.batch_stats
    for r in range(max(map(len, plans), default=0)):
        active = np.array([r < len(plan) for plan in plans])
        # An idle surrogate's slot reuses the first plan's entry; its result is
        # dropped below.
        k0, lr0 = next(plan[r] for plan in plans if r < len(plan))
        keys = [plan[r][0] if r < len(plan) else k0 for plan in plans]
        lrs = [plan[r][1] if r < len(plan) else lr0 for plan in plans]
        p, s, _ = epoch_fn(
            params,
            stats,
            images,
            labels,
            jnp.stack(keys),
            jnp.asarray(lrs, jnp.float32),
        )

        def keep(new, old, active=active):
            mask = jnp.asarray(active).reshape(-1, *[1] * (old.ndim - 1))
            return jnp.where(mask, new, old)

        params, stats = jax.tree.map(keep, (p, s), (params, stats))
    return [p[:2] for p in _members(Surrogates(params, stats, np.zeros(m)))]


def _clean_epochs(epoch_fn, model, variables, config, surrogates, images, labels, key):
    """Every surrogate trains one clean epoch; at the end of its period it starts
    afresh. Returns (key, surrogates). Keys are split surrogate by surrogate, a
    restart's right after its epoch's."""
    period = config.surrogates * config.stagger
    plans, restart_keys = [], []
    for e in surrogates.epoch:
        key, k = jax.random.split(key)
        plans.append([(k, surrogate_lr(config, int(e)))])
        if e + 1 >= period:
            key, init_key = jax.random.split(key)
            restart_keys.append(init_key)
    members = [(p, s) for p, s, _ in _members(surrogates)]
    trained = run_epochs(epoch_fn, config, members, plans, images, labels)
    new, restarts = [], iter(restart_keys)
    for (params, stats), e in zip(trained, surrogates.epoch, strict=True):
        e = int(e) + 1
        if e >= period:
            (params, stats), e = _fresh(model, variables, config, next(restarts)), 0
        new.append((params, stats, e))
    return key, _stack(new)


def make_step(model: Model, variables, config: MetaPoisonConfig):
    """The craft step `step(state, problem) -> (state, aux)` (Alg. 1, one outer step).

    Metagradients of every surrogate and poison chunk (each a jitted call from the
    host with `ensemble="loop"`; one program per chunk with "devices", the
    surrogates dealt over the local devices; else one vmapped or mapped program),
    their mean, an Adam step scaled by the craft rate, the projection into the
    eps-ball; then every surrogate trains one clean epoch (`run_epochs`) and
    restarts at epoch M * stagger. Pure:
    the new state is a function of `state` and `problem`. `aux` holds the
    ensemble's mean adversarial loss and the surrogates' epochs before the step.
    """

    def step(state: MetaPoisonState, problem: CraftProblem):
        bases = centres(problem, config)
        num = bases.shape[0]
        chunks, per = chunking(num, config)
        metagrad, epoch_fn = _programs(model, config, problem.images.shape[0], per)
        images, labels = jnp.asarray(problem.images), jnp.asarray(problem.labels)
        targets = jnp.asarray(problem.targets, jnp.float32)
        members = _members(state.surrogates)
        lrs = [surrogate_lr(config, e) for _, _, e in members]
        # Fixed-shape chunks: the poisons padded to chunks * per rows, weight 0.
        pad = chunks * per - num
        valid = jnp.concatenate([jnp.ones(num), jnp.zeros(pad)]).reshape(chunks, per)
        base_labels = jnp.pad(jnp.asarray(problem.base_labels), (0, pad))
        poisons = jnp.pad(bases + state.delta, ((0, pad),) + ((0, 0),) * 3)
        poisons = poisons.reshape(chunks, per, *bases.shape[1:])
        key, fill_rows = _fill_rows(
            state.key,
            jnp.asarray(problem.clean_rows),
            config,
            chunks,
            config.batch_size - per,
        )
        grads, losses = [], []
        for c in range(chunks):
            chunk = (poisons[c], valid[c], base_labels.reshape(chunks, per)[c])
            rest = (
                images[fill_rows[c]].astype(jnp.float32) / 255.0,
                labels[fill_rows[c]],
                targets,
                jnp.asarray(problem.adv_labels),
            )
            g, values = _ensemble_metagrad(
                metagrad, config, state.surrogates, members, lrs, chunk, rest
            )
            grads.append(g)
            losses.extend(values)
        grad = jnp.stack(grads).reshape(-1, *bases.shape[1:])[:num]
        updates, opt_state = ADAM.update(grad, state.opt_state)
        rate = craft_rate(config, state.step)
        delta = project(state.delta - rate * updates, bases, config.epsilon)
        aux = {
            "adversarial_loss": float(np.mean([float(v) for v in losses])),
            "surrogate_epochs": [e for _, _, e in members],
        }
        key, surrogates = _clean_epochs(
            epoch_fn, model, variables, config, state.surrogates, images, labels, key
        )
        state = MetaPoisonState(delta, opt_state, surrogates, key, state.step + 1)
        return state, aux

    return step


def craft(
    model: Model,
    variables,
    problem: CraftProblem,
    config: MetaPoisonConfig,
    key,
    log=None,
):
    """Crafts the poisons of one problem; returns (poisons, info).

    The driver loop: `init`, then `config.craft_steps` calls of the pure `step`
    from the host, so progress can be logged (`log(entry)` per step).
    `info["history"]` holds per craft step the ensemble's mean adversarial loss
    and the surrogates' epochs; `info["centres"]` the eps-ball's centres.
    """
    state = init(model, variables, problem, config, key)
    step = make_step(model, variables, config)
    history = []
    for s in range(config.craft_steps):
        state, aux = step(state, problem)
        history.append({"craft_step": s, **aux})
        if log is not None:
            log(history[-1])
    bases = centres(problem, config)
    return bases + state.delta, {"history": history, "centres": bases}
