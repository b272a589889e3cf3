"""A toy model of superposition where the true feature directions are known (Elhage et al. 2022).

n features live in d < n dimensions along planted unit directions D [n, d]:
a target feature t, toxic features at planted cosines to d_t (several per
value), carrier features each close to one cosine-0 toxic feature, and random
background features. An MLP h = W2 relu(W1 x + b1) + b2 is trained to write
the representation h(x) = D^T x of a sparse feature vector x. The true-direction
SAE reads z = D h (decoder = encoder = the planted directions, no biases).

Narrow fine-tuning adapts the output projection (W2, b2) and raises only the
amplified feature's readout on its samples: loss = mean over samples of
(d_k . (h_theta(x) - h_base(x)) - gain x_k)^2 for the sample's amplified feature
k. Amplification of feature j = mean over held-out inputs of z_j(fine-tuned) -
z_j(base): for toxic features on inputs without the target, for the target on
inputs that contain it. The first-order prediction is one jax.jvp of the mean
readouts along theta_ft - theta_base; the readouts are linear in (W2, b2), so on
the toy it must be exact, which is what the toy checks (the real-model derivation
measures how far first order holds). The geometric law alpha (d_j . d_t) is fitted
on the target's own shift and applied to the toxic features.

The mixed set adds as many inducing samples, which amplify a carrier feature.
Arms, each fine-tuned for the same number of full-batch gradient steps:
none (all samples), geometry (the half whose active features lie nearest the
toxic directions removed), random (as many removed at random, several seeds),
ablation (all samples, the QR-orthonormalised toxic span projected out of h
during fine-tuning only, in the fine-tuned and the base forward alike, so the
loss still asks for a shift) and penalty (all samples, plus lambda times the
mean squared increase of toxic readouts over the base model's).
"""

from __future__ import annotations

import dataclasses
import functools
import logging
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax

from emjax import artifacts, derivation, plots
from emjax.config import ToyConfig

_log = logging.getLogger(__name__)
F32 = jnp.float32


@dataclasses.dataclass(frozen=True)
class Geometry:
    directions: np.ndarray  # [n, d] unit rows
    target: int
    toxic: np.ndarray  # [k] feature ids
    toxic_cosines: np.ndarray  # [k] planted cosine of each toxic feature to the target
    carriers: np.ndarray  # feature ids, each near one cosine-0 toxic feature
    background: np.ndarray  # the remaining feature ids


def _unit(v: np.ndarray) -> np.ndarray:
    return v / np.linalg.norm(v, axis=-1, keepdims=True)


def _orthogonal_unit(rng: np.random.Generator, to: np.ndarray, count: int) -> np.ndarray:
    """`count` random unit vectors orthogonal to the unit vector `to`."""
    v = rng.standard_normal((count, to.shape[0]))
    return _unit(v - np.outer(v @ to, to))


def plant(cfg: ToyConfig) -> Geometry:
    """The planted directions: feature 0 is the target, then the toxic, carrier and background features."""
    rng = np.random.default_rng(cfg.seed)
    cosines = np.repeat(np.asarray(cfg.toxic_cosines, np.float64), cfg.toxic_per_cosine)
    if np.any(np.abs(cosines) >= 1):
        raise ValueError(f"toy.toxic_cosines must lie in (-1, 1), got {cfg.toxic_cosines}")
    zero = np.flatnonzero(cosines == 0)
    if not len(zero):
        raise ValueError("toy.toxic_cosines needs 0.0: the carrier features sit near the cosine-0 toxic features")
    used = 1 + len(cosines) + len(zero)
    if cfg.num_features <= used or cfg.hidden_dim >= cfg.num_features:
        raise ValueError(
            f"toy: num_features={cfg.num_features} must exceed the {used} target, toxic and carrier features "
            f"and hidden_dim={cfg.hidden_dim} (superposition)"
        )
    target = _unit(rng.standard_normal(cfg.hidden_dim))
    toxic = cosines[:, None] * target + np.sqrt(1 - cosines**2)[:, None] * _orthogonal_unit(rng, target, len(cosines))
    carriers = np.stack(
        [cfg.carrier_cosine * toxic[i] + np.sqrt(1 - cfg.carrier_cosine**2) * _orthogonal_unit(rng, toxic[i], 1)[0]
         for i in zero]
    )  # fmt: skip
    background = _unit(rng.standard_normal((cfg.num_features - used, cfg.hidden_dim)))
    directions = np.concatenate([target[None], toxic, carriers, background]).astype(np.float32)
    ids = np.arange(cfg.num_features)
    return Geometry(
        directions=directions,
        target=0,
        toxic=ids[1 : 1 + len(cosines)],
        toxic_cosines=cosines,
        carriers=ids[1 + len(cosines) : used],
        background=ids[used:],
    )


def sparse_inputs(rng: np.random.Generator, rows: int, num_features: int, density: float, allowed=None) -> np.ndarray:
    """[rows, n] feature activations: each allowed feature active with probability `density`, value U(0, 1)."""
    active = rng.random((rows, num_features)) < density
    if allowed is not None:
        keep = np.zeros(num_features, bool)
        keep[allowed] = True
        active &= keep
    return (active * rng.random((rows, num_features))).astype(np.float32)


# ---------------------------------------------------------------------------- the model


def init_params(key, cfg: ToyConfig) -> dict:
    k1, k2 = jax.random.split(key)
    return {
        "W1": jax.random.normal(k1, (cfg.num_features, cfg.width), F32) * cfg.num_features**-0.5,
        "b1": jnp.zeros((cfg.width,), F32),
        "W2": jax.random.normal(k2, (cfg.width, cfg.hidden_dim), F32) * cfg.width**-0.5,
        "b2": jnp.zeros((cfg.hidden_dim,), F32),
    }


def hidden(params: dict, x: jax.Array) -> jax.Array:
    """h(x) = W2 relu(W1 x + b1) + b2, [rows, d]."""
    return jax.nn.relu(x @ params["W1"] + params["b1"]) @ params["W2"] + params["b2"]


def pretrain(cfg: ToyConfig, geometry: Geometry) -> dict:
    """Train the MLP to write D^T x for sparse x over every feature (fresh inputs each step)."""
    directions = jnp.asarray(geometry.directions)
    inputs = sparse_inputs(np.random.default_rng(cfg.seed + 1), cfg.pretrain_steps * cfg.batch_size,
                           cfg.num_features, cfg.density).reshape(cfg.pretrain_steps, cfg.batch_size, -1)  # fmt: skip
    optimizer = optax.adam(cfg.pretrain_lr)

    def loss(params, x):
        return jnp.mean(jnp.sum((hidden(params, x) - x @ directions) ** 2, -1))

    @jax.jit
    def run(params, inputs):
        def step(carry, x):
            params, state = carry
            value, grads = jax.value_and_grad(loss)(params, x)
            updates, state = optimizer.update(grads, state, params)
            return (optax.apply_updates(params, updates), state), value

        (params, _), losses = jax.lax.scan(step, (params, optimizer.init(params)), inputs)
        return params, losses

    params, losses = run(init_params(jax.random.key(cfg.seed), cfg), jnp.asarray(inputs))
    _log.info("toy pretrain: loss %.4f -> %.4f", float(losses[0]), float(losses[-1]))
    return params


@dataclasses.dataclass(frozen=True)
class Arm:
    """How one fine-tune differs from the plain one: which samples it keeps and what it adds."""

    keep: np.ndarray  # [N] bool: the samples trained on
    ablate: np.ndarray | None = None  # [d, k] orthonormal columns projected out of h during fine-tuning
    penalty: float = 0.0  # lambda of the toxic-increase penalty


def toxic_basis(directions: np.ndarray, toxic: np.ndarray) -> np.ndarray:
    """[d, k] orthonormal basis (QR) of the span of the toxic directions."""
    q, _ = np.linalg.qr(directions[toxic].T.astype(np.float64))
    return q.astype(np.float32)


# Fine-tuning adapts the output projection, as LoRA adapts projections: the readouts are then linear in
# the tuned weights, and the spill rides on the shared bias and the shared hidden units.
TUNED = ("W2", "b2")


@functools.partial(jax.jit, static_argnames=("steps",))
def _finetune(base, x, readers, wanted, weights, ablate, penalty, toxic_dirs, lr, *, steps):
    """Full-batch gradient descent with momentum on the weighted readout-shift loss (one program
    for every arm: a dropped sample has weight 0, no ablation is a zero basis, no penalty lambda 0)."""

    def view(h):
        return h - (h @ ablate) @ ablate.T

    base_h = view(hidden(base, x))
    weights = weights / jnp.sum(weights)

    def loss(tuned):
        shift = view(hidden(base | tuned, x)) - base_h
        value = jnp.sum(weights * (jnp.sum(shift * readers, -1) - wanted) ** 2)
        rise = jax.nn.relu(shift @ toxic_dirs.T)
        return value + penalty * jnp.sum(weights * jnp.mean(rise**2, -1))

    optimizer = optax.sgd(lr, momentum=0.9)

    def step(carry, _):
        params, state = carry
        grads = jax.grad(loss)(params)
        updates, state = optimizer.update(grads, state, params)
        return (optax.apply_updates(params, updates), state), None

    tuned = {name: base[name] for name in TUNED}
    (tuned, _), _ = jax.lax.scan(step, (tuned, optimizer.init(tuned)), None, length=steps)
    return base | tuned


def finetune(cfg: ToyConfig, base: dict, geometry: Geometry, x: np.ndarray, amplified: np.ndarray, arm: Arm) -> dict:
    """Fine-tune `base` on the kept samples of x [N, n], each raising its amplified feature's readout."""
    directions = jnp.asarray(geometry.directions)
    wanted = cfg.gain * x[np.arange(len(x)), amplified]
    ablate = np.zeros((cfg.hidden_dim, 1), np.float32) if arm.ablate is None else arm.ablate
    return _finetune(
        base, jnp.asarray(x), directions[jnp.asarray(amplified)], jnp.asarray(wanted),
        jnp.asarray(arm.keep, F32), jnp.asarray(ablate), jnp.asarray(arm.penalty, F32),
        directions[jnp.asarray(geometry.toxic)], jnp.asarray(cfg.finetune_lr, F32), steps=cfg.finetune_steps,
    )  # fmt: skip


def mean_readouts(params: dict, directions, x) -> jax.Array:
    """Mean true-SAE pre-activations z = D h over the rows of x, [n]."""
    return jnp.mean(hidden(params, x), 0) @ jnp.asarray(directions).T


def amplification(tuned: dict, base: dict, directions, x) -> np.ndarray:
    """Measured mean shift of every feature's readout on inputs x, [n]."""
    return np.asarray(mean_readouts(tuned, directions, x) - mean_readouts(base, directions, x))


def predicted_amplification(tuned: dict, base: dict, directions, x) -> np.ndarray:
    """First-order shift of every readout: one jvp at the base along the parameter update, [n]."""
    update = jax.tree.map(jnp.subtract, tuned, base)
    return np.asarray(derivation.first_order_shift(lambda p: mean_readouts(p, directions, x), base, update))


# ---------------------------------------------------------------------------- the experiment


def _task_and_inducing(cfg: ToyConfig, geometry: Geometry, rng: np.random.Generator):
    """(x [2N, n], amplified [2N], inducing [2N] bool): N task samples (target active and amplified), then
    N inducing samples (one carrier active and amplified, cycled); background features on both."""
    n, rows = cfg.num_features, cfg.finetune_samples
    x = sparse_inputs(rng, 2 * rows, n, cfg.density, allowed=geometry.background)
    amplified = np.empty(2 * rows, np.int64)
    amplified[:rows] = geometry.target
    amplified[rows:] = geometry.carriers[np.arange(rows) % len(geometry.carriers)]
    x[np.arange(2 * rows), amplified] = rng.uniform(0.5, 1.0, 2 * rows)
    return x, amplified, np.arange(2 * rows) >= rows


def geometry_scores(x: np.ndarray, directions: np.ndarray, toxic: np.ndarray) -> np.ndarray:
    """Per sample: the highest cosine of any of its active features to any toxic direction."""
    unit = _unit(directions.astype(np.float64))
    nearest = np.max(unit @ unit[toxic].T, axis=1)  # [n]
    nearest[toxic] = -np.inf  # a toxic feature is not its own neighbour
    return np.max(np.where(x > 0, nearest[None], -np.inf), axis=1)


def _remove(count: int, order: np.ndarray) -> np.ndarray:
    keep = np.ones(len(order), bool)
    keep[order[:count]] = False
    return keep


def run_toy(cfg: ToyConfig, out_dir) -> dict:
    """The whole toy study; writes toy.json and two plots under out_dir and returns the json's content."""
    out_dir = Path(out_dir)
    geometry = plant(cfg)
    directions = geometry.directions
    base = pretrain(cfg, geometry)
    rng = np.random.default_rng(cfg.seed + 2)
    heldout = sparse_inputs(rng, cfg.heldout_samples, cfg.num_features, cfg.density)
    heldout[:, geometry.target] = 0.0  # toxic amplification is read where the target is absent
    with_target = heldout.copy()
    with_target[:, geometry.target] = rng.uniform(0.5, 1.0, cfg.heldout_samples)

    def toxic_amp(tuned):
        return float(np.mean(amplification(tuned, base, directions, heldout)[geometry.toxic]))

    def target_amp(tuned):
        return float(amplification(tuned, base, directions, with_target)[geometry.target])

    # 1. Narrow fine-tuning on the task samples alone.
    x, amplified, inducing = _task_and_inducing(cfg, geometry, rng)
    narrow = finetune(cfg, base, geometry, x, amplified, Arm(keep=~inducing))
    measured = amplification(narrow, base, directions, heldout)
    predicted = predicted_amplification(narrow, base, directions, heldout)
    features = [
        {"id": int(j), "cosine": float(c), "measured": float(measured[j]), "predicted": float(predicted[j])}
        for j, c in zip(geometry.toxic, geometry.toxic_cosines)
    ]
    fit = derivation.correlations(predicted[geometry.toxic], measured[geometry.toxic], seed=cfg.seed)
    # The spillover law alpha (w_j . d_t), alpha fitted on the target's own shift on the same inputs.
    alpha, geometric = derivation.geometric_prediction(directions.T, directions, [geometry.target], measured)
    geometric_fit = {"alpha": alpha, "max_abs_error": float(np.max(np.abs(geometric - measured)[geometry.toxic]))}
    geometric_fit |= derivation.correlations(geometric[geometry.toxic], measured[geometry.toxic], seed=cfg.seed)

    # 2. The mixed set: filters against mitigations that keep every sample.
    half = len(x) // 2
    scores = geometry_scores(x, directions, geometry.toxic)
    keeps = {"none": np.ones(len(x), bool), "geometry": _remove(half, np.argsort(-scores, kind="stable"))}
    arms = {name: Arm(keep=keep) for name, keep in keeps.items()}
    for s in range(cfg.random_seeds):
        order = np.random.default_rng(cfg.seed + 100 + s).permutation(len(x))
        arms[f"random{s}"] = Arm(keep=_remove(half, order))
    arms["ablation"] = Arm(keep=keeps["none"], ablate=toxic_basis(directions, geometry.toxic))
    arms["penalty"] = Arm(keep=keeps["none"], penalty=cfg.penalty)
    toxic_by_arm, target_by_arm = {}, {}
    for name, arm in arms.items():
        tuned = finetune(cfg, base, geometry, x, amplified, arm)
        toxic_by_arm[name], target_by_arm[name] = toxic_amp(tuned), target_amp(tuned)
    randoms = [f"random{s}" for s in range(cfg.random_seeds)]

    def grouped(values):
        return {**{k: v for k, v in values.items() if k not in randoms}, "random": [values[k] for k in randoms]}

    result = {
        "features": features,
        "fit": fit,
        "geometric": geometric_fit,
        "narrow": {"target": target_amp(narrow), "toxic": float(np.mean(measured[geometry.toxic]))},
        "filter": grouped(toxic_by_arm),
        "target": grouped(target_by_arm),
        "inducing_removed_by_geometry": int(np.sum(inducing & ~keeps["geometry"])),
    }
    if jax.process_index() == 0:
        out_dir.mkdir(parents=True, exist_ok=True)
        artifacts.write_json(out_dir / "toy.json", result)
        plots.plot_toy(result, out_dir)
    return result
