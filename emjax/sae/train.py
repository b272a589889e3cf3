"""Train an SAE on batches of activations, data-parallel and feature-sharded over a mesh.

The method follows the architecture of the SAE passed in; each class in
emjax.sae.model owns its part (this module never asks an SAE's type):

- ReLUSAE: reconstruction + l1_loss = l1_coefficient * sum_i f_i |W_dec row i| (no norm constraint).
- JumpReLUSAE: reconstruction + l0_loss = l0_coefficient * L0, with the straight-through
  estimators of Gemma Scope (rectangle kernel of width `bandwidth`) for the threshold.
- TopKSAE / BatchTopKSAE: reconstruction + aux_k_loss = aux_k_coefficient * AuxK, where AuxK
  asks the top dead latents to reconstruct the residual; BatchTopK also tracks
  the JumpReLU threshold it is used with after training (EMA of the smallest
  selected activation).

Reconstruction is the squared error summed over d_in, averaged over rows.
Decoder rows stay unit norm for every method but ReLU (gradient parallel to each
row removed, rows renormalised after each step). Adam with linear warm-up and a
linear decay to zero over the last `decay_fraction` of the steps.

Each step sees one batch [rows, d_in] from the iterator (this process's rows on
a multi-host run). The loop is emjax.loop's: checkpoints (orbax) hold
parameters, optimiser state and training statistics; a rerun with the same
checkpoint_dir resumes from the latest one and skips the batches already
consumed, so the iterator must replay the same batches in the same order.
SIGTERM / Ctrl-C save and raise emjax.loop.Interrupted; a non-finite loss
raises emjax.loop.NonFiniteLoss.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import math
import os
from collections.abc import Iterable, Sequence
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from emjax import distributed, loop
from emjax.distributed import DEFAULT_RULES
from emjax.models.layers import F32
from emjax.sae.model import SAE, create


@dataclasses.dataclass(frozen=True)
class SAETrainConfig:
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
    keep_checkpoint_every: int = 0  # also keep every checkpoint whose step this divides (0: only the last two)
    log_every: int = 100
    progress: bool = True

    def __post_init__(self):
        if self.b_dec_init not in ("geometric_median", "mean", "zeros"):
            raise ValueError(f"b_dec_init must be geometric_median, mean or zeros, got {self.b_dec_init!r}")
        for field in ("steps", "log_every"):
            if getattr(self, field) < 1:
                raise ValueError(f"SAETrainConfig.{field}={getattr(self, field)} must be at least 1")
        for field in ("warmup_steps", "checkpoint_every", "keep_checkpoint_every", "dead_after_tokens"):
            if getattr(self, field) < 0:
                raise ValueError(f"SAETrainConfig.{field}={getattr(self, field)} must be 0 or more")
        if not 0.0 <= self.decay_fraction <= 1.0:
            raise ValueError(f"SAETrainConfig.decay_fraction={self.decay_fraction} must be in [0, 1]")


# ---------------------------------------------------------------------------- one step


def _loss(params, graphdef, x, dead, config: SAETrainConfig):
    sae = nnx.merge(graphdef, params)
    f, h = sae.training_activations(x, config)
    x_hat = sae.decode(f)
    residual = x - x_hat
    reconstruction = jnp.sum(residual**2, axis=-1).mean()
    total_variance = jnp.sum((x - x.mean(0)) ** 2)
    extras = sae.extra_losses(f=f, h=h, residual=residual, dead=dead, total_variance=total_variance, config=config)
    clash = set(extras) & {"loss", "mse", "fvu", "l0", "dead_fraction"}
    if clash:
        raise ValueError(f"{type(sae).__name__}.extra_losses names {sorted(clash)} clash with the trainer's metrics")
    loss = reconstruction + sum(extras.values())
    metrics = {
        "loss": loss,
        "mse": jnp.mean(residual**2),
        "fvu": jnp.sum(residual**2) / total_variance,
        "l0": (f > 0).sum(-1).mean(),
        **extras,
    }
    return loss, (f, metrics)


def _train_step(params, opt_state, stats, x, *, graphdef, optimizer, config: SAETrainConfig):
    x = x.astype(F32) * stats["input_scale"]
    dead = stats["tokens_since_fired"] >= config.dead_after_tokens
    (_, (f, metrics)), grads = jax.value_and_grad(_loss, has_aux=True)(params, graphdef, x, dead, config)
    grads = nnx.merge(graphdef, params).constrain_gradients(grads)
    updates, opt_state = optimizer.update(grads, opt_state, params)
    sae = nnx.merge(graphdef, optax.apply_updates(params, updates))
    stats = sae.post_update(stats, f, config)
    params = nnx.to_pure_dict(nnx.state(sae))

    fired = (f > 0).any(axis=0)
    tokens = jnp.minimum(stats["tokens_since_fired"] + x.shape[0], config.dead_after_tokens)
    stats = dict(stats, tokens_since_fired=jnp.where(fired, 0, tokens), step=stats["step"] + 1)
    metrics["dead_fraction"] = dead.mean()
    return params, opt_state, stats, metrics


def _schedule(config: SAETrainConfig):
    decay_steps = int(config.decay_fraction * config.steps)

    def lr(count):
        warm = jnp.minimum(1.0, (count + 1) / max(config.warmup_steps, 1))
        decay = jnp.clip((config.steps - count) / decay_steps, 0.0, 1.0) if decay_steps else 1.0
        return config.lr * warm * decay

    return lr


def make_optimizer(config: SAETrainConfig) -> optax.GradientTransformation:
    return loop.with_clipping(
        optax.adam(_schedule(config), b1=config.adam_b1, b2=config.adam_b2), config.grad_clip_norm
    )


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


def _initial_state(sae: SAE, first_batch: jax.Array, mesh, rules, config: SAETrainConfig):
    """Parameters on the mesh, b_dec (and the input scale) from the first global batch; `sae` is left as it was."""
    graphdef, state = nnx.split(sae)
    work = nnx.merge(graphdef, state)
    work.prepare_training(config)
    params = nnx.to_pure_dict(nnx.state(work))
    shardings = _param_shardings(sae, mesh, rules)
    x = first_batch.astype(F32)
    scale = math.sqrt(sae.d_in) / float(jnp.linalg.norm(x, axis=-1).mean()) if config.normalize_inputs else 1.0
    x = x * scale
    if config.b_dec_init == "geometric_median":
        params["b_dec"] = jax.jit(geometric_median)(x).astype(sae.dtype)
    elif config.b_dec_init == "mean":
        params["b_dec"] = x.mean(0).astype(sae.dtype)
    params = {name: jax.device_put(value, shardings[name]) for name, value in params.items()}
    replicated = NamedSharding(mesh, PartitionSpec())
    stats = {
        "tokens_since_fired": jax.device_put(jnp.zeros((sae.d_sae,), jnp.int32), shardings["b_enc"]),
        "step": jax.device_put(jnp.zeros((), jnp.int32), replicated),
        "input_scale": jax.device_put(jnp.asarray(scale, F32), replicated),
    }
    stats |= {name: jax.device_put(value, replicated) for name, value in sae.training_stats().items()}
    return graphdef, params, stats


# ---------------------------------------------------------------------------- the trainer


def train(
    sae: SAE,
    batches: Iterable,
    config: SAETrainConfig,
    *,
    mesh: Mesh | None = None,
    rules=None,
    checkpoint_dir: str | os.PathLike | None = None,
    callbacks: Sequence[loop.Callback] = (),
) -> tuple[SAE, list[dict]]:
    """Train `sae` for config.steps batches; returns (the trained SAE, logged metrics).

    With a mesh, batches split over its data axes and W_enc / W_dec over the
    feature axis (rules["sae"]). The returned SAE reads raw activations: with
    normalize_inputs it carries the scale as `input_scale` (folded on save).
    With a checkpoint_dir, the metrics also go to checkpoint_dir/metrics.jsonl.
    Each of `callbacks` is called as `callback(step, metrics, sae)` after every
    step with the SAE as trained so far (see emjax.loop; raise
    emjax.loop.StopTraining to stop early).
    """
    if sae.input_scale != 1.0:
        raise ValueError("train() expects an SAE with input_scale 1; set SAETrainConfig.normalize_inputs instead")
    mesh = distributed.auto_mesh(mesh) if mesh is not None else distributed.make_mesh(devices=jax.devices()[:1])
    rules = DEFAULT_RULES if rules is None else rules
    batches = iter(batches)
    first = np.asarray(next(batches))
    graphdef, params, stats = _initial_state(sae, distributed.shard_batch(first, mesh, rules), mesh, rules, config)
    optimizer = make_optimizer(config)
    state = {"params": params, "opt": loop.init_optimizer(optimizer, params, mesh), "stats": stats}
    shardings = jax.tree.map(lambda a: a.sharding, (state["params"], state["opt"], state["stats"]))
    step_fn = jax.jit(
        functools.partial(_train_step, graphdef=graphdef, optimizer=optimizer, config=config),
        out_shardings=(*shardings, None),
        donate_argnums=loop.donatable((0, 1, 2)),
    )

    checkpoints = loop.Checkpoints(checkpoint_dir, keep_every=config.keep_checkpoint_every)
    start, state = checkpoints.maybe_restore(state)
    log = loop.MetricsLog(None if checkpoint_dir is None else Path(checkpoint_dir) / "metrics.jsonl", start)
    # Batch i of the stream feeds step i: a resumed run skips the batches its checkpoint has consumed.
    stream = itertools.islice(itertools.chain([first], batches), start, None)

    def step(i: int, state: dict):
        batch = next(stream, None)
        if batch is None:
            raise ValueError(f"the batch iterator ended after {i} batches; {config.steps} steps were asked")
        x = distributed.shard_batch(np.asarray(batch), mesh, rules)
        params, opt_state, stats, metrics = step_fn(state["params"], state["opt"], state["stats"], x)
        return {"params": params, "opt": opt_state, "stats": stats}, metrics, x.shape[0]

    def trained(state: dict) -> SAE:
        sae = nnx.merge(graphdef, state["params"])
        sae.input_scale = float(state["stats"]["input_scale"])
        return sae

    state = loop.run(
        step, state, start=start, total_steps=config.steps, checkpoints=checkpoints, metrics=log,
        model=trained, callbacks=callbacks, log_every=config.log_every, checkpoint_every=config.checkpoint_every,
        unit="samples", progress=config.progress,
    )  # fmt: skip
    return trained(state), log.records


# ---------------------------------------------------------------------------- a study's SAE on its activations


def layer_seed(seed: int, layer: int) -> int:
    """Each layer's SAE its own initialisation and batch order: with one seed, every layer starts from the
    same dictionary and the same feature ids can top every layer's lists."""
    return int(np.random.SeedSequence([seed, layer]).generate_state(1)[0] % (1 << 31))


def token_budget_error(tokens: int, width: int, tokens_per_latent: float) -> str | None:
    """Why `tokens` training tokens are too few for `width` latents (None: they are enough): an SAE trained here
    needs `tokens_per_latent` training tokens per latent."""
    per_latent = tokens / width
    if per_latent >= tokens_per_latent:
        return None
    return (f"{tokens:,} training tokens for {width:,} latents ({per_latent:.1f} per latent) < "
            f"sae.tokens_per_latent={tokens_per_latent:g}: about {int(np.ceil(tokens_per_latent * width)):,} tokens "
            "are needed")  # fmt: skip


def batches(x: np.ndarray, size: int, seed: int):
    """Shuffled batches, epoch after epoch, the same sequence for the same seed (resume replays it)."""
    rng = np.random.default_rng(seed)
    size = min(size, len(x))
    while True:
        order = rng.permutation(len(x))
        for lo in range(0, len(x) - size + 1, size):
            yield x[order[lo : lo + size]]


def train_on(x: np.ndarray, s, *, seed: int, checkpoint_dir: Path, progress: bool = True):
    """(a new SAE of the `sae` config `s`, trained on activations `x` [tokens, d_model]; its metric records),
    resumable from `checkpoint_dir`."""
    sae = create(s.architecture, x.shape[1], s.width, k=s.k, rngs=nnx.Rngs(seed))
    config = SAETrainConfig(
        steps=s.steps, lr=s.lr, warmup_steps=min(s.warmup_steps, s.steps // 2), normalize_inputs=True,
        checkpoint_every=max(1, s.steps // 4), log_every=max(1, s.steps // 20), progress=progress,
    )  # fmt: skip
    return train(sae, batches(x, s.batch_size, seed), config, checkpoint_dir=checkpoint_dir)
