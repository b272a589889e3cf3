"""Train an SAE on batches of activations, data-parallel and feature-sharded over a mesh.

The method follows the architecture of the SAE passed in:

- ReLUSAE: reconstruction + l1_coefficient * sum_i f_i |W_dec row i| (no norm constraint).
- JumpReLUSAE: reconstruction + l0_coefficient * L0, with the straight-through
  estimators of Gemma Scope (rectangle kernel of width `bandwidth`) for the threshold.
- TopKSAE / BatchTopKSAE: reconstruction + aux_k_coefficient * AuxK, where AuxK
  asks the top dead latents to reconstruct the residual; BatchTopK also tracks
  the JumpReLU threshold it is used with after training (EMA of the smallest
  selected activation).

Reconstruction is the squared error summed over d_in, averaged over rows.
Decoder rows stay unit norm for every method but ReLU (gradient parallel to each
row removed, rows renormalised after each step). Adam with linear warm-up and a
linear decay to zero over the last `decay_fraction` of the steps.

Each step sees one batch [rows, d_in] from the iterator (this process's rows on
a multi-host run). Checkpoints (orbax) hold parameters, optimiser state and
dead-latent counters; a rerun with the same checkpoint_dir resumes from the latest
one and skips the batches already consumed, so the iterator must replay the
same batches in the same order.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import logging
import math
import os
from collections.abc import Iterable

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec
from tqdm.auto import tqdm

from emjax import distributed
from emjax.distributed import DEFAULT_RULES
from emjax.models.layers import F32
from emjax.sae.model import SAE, BatchTopKSAE, JumpReLUSAE, ReLUSAE, TopKSAE

_log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    steps: int
    lr: float = 2e-4
    warmup_steps: int = 1000
    decay_fraction: float = 0.2
    adam_b1: float = 0.9
    adam_b2: float = 0.999
    grad_clip_norm: float | None = 1.0
    l1_coefficient: float = 5.0
    l0_coefficient: float = 1.0
    jumprelu_bandwidth: float = 0.001
    jumprelu_init_threshold: float = 0.001
    aux_k_coefficient: float = 1 / 32
    dead_after_tokens: int = 10_000_000
    batch_topk_threshold_beta: float = 0.999
    b_dec_init: str = "geometric_median"  # or "mean", "zeros"
    normalize_inputs: bool = False  # scale inputs by sqrt(d_in) / mean |x| of the first batch
    checkpoint_every: int = 0
    log_every: int = 100
    progress: bool = True

    def __post_init__(self):
        if self.b_dec_init not in ("geometric_median", "mean", "zeros"):
            raise ValueError(f"b_dec_init must be geometric_median, mean or zeros, got {self.b_dec_init!r}")


# ---------------------------------------------------------------------------- straight-through estimators


def _rectangle(u):
    return (jnp.abs(u) < 0.5).astype(u.dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def jumprelu(h, threshold, bandwidth):
    """h * H(h - threshold); d/dthreshold = -(threshold / bandwidth) K((h - threshold) / bandwidth)."""
    return h * (h > threshold)


def _jumprelu_fwd(h, threshold, bandwidth):
    return jumprelu(h, threshold, bandwidth), (h, threshold)


def _jumprelu_bwd(bandwidth, res, g):
    h, threshold = res
    d_threshold = -(threshold / bandwidth) * _rectangle((h - threshold) / bandwidth) * g
    return (h > threshold) * g, d_threshold.reshape(-1, threshold.shape[-1]).sum(0)


jumprelu.defvjp(_jumprelu_fwd, _jumprelu_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def heaviside(h, threshold, bandwidth):
    """H(h - threshold); d/dh = 0, d/dthreshold = -(1 / bandwidth) K((h - threshold) / bandwidth)."""
    return (h > threshold).astype(h.dtype)


def _heaviside_fwd(h, threshold, bandwidth):
    return heaviside(h, threshold, bandwidth), (h, threshold)


def _heaviside_bwd(bandwidth, res, g):
    h, threshold = res
    d_threshold = -(1.0 / bandwidth) * _rectangle((h - threshold) / bandwidth) * g
    return jnp.zeros_like(h), d_threshold.reshape(-1, threshold.shape[-1]).sum(0)


heaviside.defvjp(_heaviside_fwd, _heaviside_bwd)


# ---------------------------------------------------------------------------- losses


def _aux_k_loss(sae: SAE, h, residual, dead, total_variance):
    """Top dead latents (by relu(h)) reconstruct the residual x - x_hat (sparsify / OpenAI AuxK)."""
    k_aux = min(sae.d_in // 2, sae.d_sae)
    num_dead = dead.sum()
    candidates = jnp.where(dead, jax.nn.relu(h), -jnp.inf)
    values, index = jax.lax.top_k(candidates, k_aux)
    values = jnp.where(jnp.isfinite(values), values, 0.0)
    acts = jnp.put_along_axis(jnp.zeros_like(h), index, values, axis=-1, inplace=False)
    e_hat = jnp.matmul(acts.astype(sae.dtype), sae.W_dec[...], preferred_element_type=F32)
    scale = jnp.minimum(num_dead / k_aux, 1.0)
    loss = scale * jnp.sum((e_hat - jax.lax.stop_gradient(residual)) ** 2) / total_variance
    return jnp.where(num_dead > 0, loss, 0.0)


def _loss(params, graphdef, x, dead, config: TrainConfig):
    sae = nnx.merge(graphdef, params)
    if isinstance(sae, BatchTopKSAE):
        f, h = sae.encode_batch_topk(x)
    elif isinstance(sae, JumpReLUSAE):
        h = sae.pre_activations(x)
        f = jumprelu(h, sae.threshold[...].astype(F32), config.jumprelu_bandwidth)
    else:
        f, h = sae.encode_with_pre(x)
    x_hat = sae.decode(f)
    residual = x - x_hat
    reconstruction = jnp.sum(residual**2, axis=-1).mean()
    total_variance = jnp.sum((x - x.mean(0)) ** 2)
    if isinstance(sae, ReLUSAE):
        penalty = config.l1_coefficient * jnp.sum(f * jnp.linalg.norm(sae.W_dec[...].astype(F32), axis=-1), -1).mean()
    elif isinstance(sae, (TopKSAE, BatchTopKSAE)):
        penalty = config.aux_k_coefficient * _aux_k_loss(sae, h, residual, dead, total_variance)
    else:
        l0 = heaviside(h, sae.threshold[...].astype(F32), config.jumprelu_bandwidth).sum(-1).mean()
        penalty = config.l0_coefficient * l0
    metrics = {
        "loss": reconstruction + penalty,
        "mse": jnp.mean(residual**2),
        "fvu": jnp.sum(residual**2) / total_variance,
        "l0": (f > 0).sum(-1).mean(),
    }
    return reconstruction + penalty, (f, metrics)


# ---------------------------------------------------------------------------- one step


def _unit_norm_decoder(sae: SAE) -> bool:
    return not isinstance(sae, ReLUSAE)


def _remove_parallel(grad_w_dec, w_dec):
    """The part of each decoder row's gradient orthogonal to the (unit) row."""
    return grad_w_dec - jnp.sum(grad_w_dec * w_dec, -1, keepdims=True) * w_dec


def _normalize_rows(w):
    return w / jnp.linalg.norm(w, axis=-1, keepdims=True)


def _train_step(params, opt_state, stats, x, *, graphdef, optimizer, config: TrainConfig):
    sae_kind = nnx.merge(graphdef, params)
    x = x.astype(F32) * stats["input_scale"]
    dead = stats["tokens_since_fired"] >= config.dead_after_tokens
    (_, (f, metrics)), grads = jax.value_and_grad(_loss, has_aux=True)(params, graphdef, x, dead, config)
    if _unit_norm_decoder(sae_kind):
        grads["W_dec"] = _remove_parallel(grads["W_dec"], params["W_dec"])
    updates, opt_state = optimizer.update(grads, opt_state, params)
    params = optax.apply_updates(params, updates)
    if _unit_norm_decoder(sae_kind):
        params["W_dec"] = _normalize_rows(params["W_dec"])
    if isinstance(sae_kind, JumpReLUSAE) and not isinstance(sae_kind, BatchTopKSAE):
        params["threshold"] = jnp.maximum(params["threshold"], 0.0)

    fired = (f > 0).any(axis=0)
    rows = x.shape[0]
    tokens = jnp.minimum(stats["tokens_since_fired"] + rows, config.dead_after_tokens)
    stats = dict(stats, tokens_since_fired=jnp.where(fired, 0, tokens), step=stats["step"] + 1)
    if isinstance(sae_kind, BatchTopKSAE):
        smallest = jnp.min(jnp.where(f > 0, f, jnp.inf))
        smallest = jnp.where(jnp.isfinite(smallest), smallest, 0.0)
        beta = config.batch_topk_threshold_beta
        old = stats["batch_topk_threshold"]
        new = jnp.where(stats["step"] == 1, smallest, beta * old + (1 - beta) * smallest)
        stats["batch_topk_threshold"] = new
        params["threshold"] = jnp.full_like(params["threshold"], new)
    metrics["dead_fraction"] = dead.mean()
    return params, opt_state, stats, metrics


def _schedule(config: TrainConfig):
    decay_steps = int(config.decay_fraction * config.steps)

    def lr(count):
        warm = jnp.minimum(1.0, (count + 1) / max(config.warmup_steps, 1))
        decay = jnp.clip((config.steps - count) / decay_steps, 0.0, 1.0) if decay_steps else 1.0
        return config.lr * warm * decay

    return lr


def make_optimizer(config: TrainConfig) -> optax.GradientTransformation:
    adam = optax.adam(_schedule(config), b1=config.adam_b1, b2=config.adam_b2)
    if config.grad_clip_norm is None:
        return adam
    return optax.chain(optax.clip_by_global_norm(config.grad_clip_norm), adam)


# ---------------------------------------------------------------------------- initialisation


def geometric_median(points: jax.Array, iterations: int = 100, tol: float = 1e-5) -> jax.Array:
    """Weiszfeld's algorithm from the mean."""

    def body(carry):
        guess, _, i = carry
        weights = 1.0 / jnp.maximum(jnp.linalg.norm(points - guess, axis=-1), 1e-12)
        new = (weights[:, None] * points).sum(0) / weights.sum()
        return new, jnp.linalg.norm(new - guess), i + 1

    def cond(carry):
        _, change, i = carry
        return (change >= tol) & (i < iterations)

    mean = points.mean(0)
    return jax.lax.while_loop(cond, body, (mean, jnp.asarray(jnp.inf, points.dtype), 0))[0]


def _param_shardings(sae: SAE, mesh: Mesh, rules) -> dict[str, NamedSharding]:
    _, state = nnx.split(sae)
    return {
        path[-1]: distributed.named_sharding(
            var.get_metadata()["logical_axes"], var.shape, mesh, rules, what=f"SAE parameter {path[-1]!r}"
        )
        for path, var in nnx.to_flat_state(state)
    }


def _initial_state(sae: SAE, first_batch: jax.Array, mesh, rules, config: TrainConfig):
    """Parameters on the mesh, b_dec (and the input scale) from the first global batch."""
    graphdef, state = nnx.split(sae)
    params = nnx.to_pure_dict(state)
    shardings = _param_shardings(sae, mesh, rules)
    x = first_batch.astype(F32)
    scale = math.sqrt(sae.d_in) / float(jnp.linalg.norm(x, axis=-1).mean()) if config.normalize_inputs else 1.0
    x = x * scale
    if config.b_dec_init == "geometric_median":
        params["b_dec"] = jax.jit(geometric_median)(x).astype(sae.dtype)
    elif config.b_dec_init == "mean":
        params["b_dec"] = x.mean(0).astype(sae.dtype)
    if isinstance(sae, JumpReLUSAE) and not isinstance(sae, BatchTopKSAE):
        params["threshold"] = jnp.full_like(params["threshold"], config.jumprelu_init_threshold)
    params = {name: jax.device_put(value, shardings[name]) for name, value in params.items()}
    feature = shardings["b_enc"]
    replicated = NamedSharding(mesh, PartitionSpec())
    stats = {
        "tokens_since_fired": jax.device_put(jnp.zeros((sae.d_sae,), jnp.int32), feature),
        "step": jax.device_put(jnp.zeros((), jnp.int32), replicated),
        "input_scale": jax.device_put(jnp.asarray(scale, F32), replicated),
        "batch_topk_threshold": jax.device_put(jnp.zeros((), F32), replicated),
    }
    return graphdef, params, stats


# ---------------------------------------------------------------------------- the loop


def train(
    sae: SAE,
    batches: Iterable,
    config: TrainConfig,
    *,
    mesh: Mesh | None = None,
    rules=None,
    checkpoint_dir: str | os.PathLike | None = None,
) -> tuple[SAE, list[dict]]:
    """Train `sae` for config.steps batches; returns (the trained SAE, logged metrics).

    With a mesh, batches split over its data axes and W_enc / W_dec over the
    feature axis (rules["sae"]). The returned SAE reads raw activations: with
    normalize_inputs it carries the scale as `input_scale` (folded on save).
    """
    if sae.input_scale != 1.0:
        raise ValueError("train() expects an SAE with input_scale 1; set TrainConfig.normalize_inputs instead")
    mesh = mesh if mesh is not None else distributed.make_mesh(devices=jax.devices()[:1])
    rules = DEFAULT_RULES if rules is None else rules
    batches = iter(batches)
    first = np.asarray(next(batches))
    graphdef, params, stats = _initial_state(sae, distributed.shard_batch(first, mesh, rules), mesh, rules, config)
    optimizer = make_optimizer(config)
    opt_state = distributed.onto_mesh(optimizer.init(params), mesh)
    shardings = jax.tree.map(lambda a: a.sharding, (params, opt_state, stats))

    manager = None
    start = 0
    if checkpoint_dir is not None:
        manager = ocp.CheckpointManager(
            os.path.abspath(checkpoint_dir), options=ocp.CheckpointManagerOptions(max_to_keep=2)
        )
        latest = manager.latest_step()
        if latest is not None:
            abstract = jax.tree.map(
                ocp.utils.to_shape_dtype_struct, {"params": params, "opt": opt_state, "stats": stats}
            )
            restored = manager.restore(latest, args=ocp.args.StandardRestore(abstract))
            params, opt_state, stats = restored["params"], restored["opt"], restored["stats"]
            start = int(latest)
            _log.info("resuming SAE training from %s at step %d", checkpoint_dir, start)

    step = jax.jit(
        functools.partial(_train_step, graphdef=graphdef, optimizer=optimizer, config=config),
        out_shardings=(*shardings, None),
        donate_argnums=(0, 1, 2),
    )
    stream = itertools.chain([first], batches)
    stream = itertools.islice(stream, start, None)
    history, metrics = [], None
    bar = tqdm(total=config.steps, initial=start, disable=not (config.progress and distributed.is_main_process()))
    try:
        for i in range(start, config.steps):
            try:
                batch = next(stream)
            except StopIteration:
                raise ValueError(
                    f"the batch iterator ended after {i} batches; {config.steps} steps were asked"
                ) from None
            x = distributed.shard_batch(np.asarray(batch), mesh, rules)
            if metrics is not None:
                # At most two steps in flight: an unbounded queue of sharded steps can starve
                # the collective rendezvous of XLA:CPU's fake devices, and gains nothing elsewhere.
                metrics["loss"].block_until_ready()
            params, opt_state, stats, metrics = step(params, opt_state, stats, x)
            done = i + 1
            if done % config.log_every == 0 or done == config.steps:
                logged = {"step": done, **{k: float(v) for k, v in metrics.items()}}
                history.append(logged)
                bar.set_postfix({k: f"{v:.4g}" for k, v in logged.items() if k != "step"})
            bar.update(1)
            if manager is not None and (
                done == config.steps or (config.checkpoint_every and done % config.checkpoint_every == 0)
            ):
                manager.save(done, args=ocp.args.StandardSave({"params": params, "opt": opt_state, "stats": stats}))
    finally:
        bar.close()
        if manager is not None:
            manager.wait_until_finished()
            manager.close()

    trained = nnx.merge(graphdef, params)
    trained.input_scale = float(stats["input_scale"])
    return trained, history
