"""LoRA fine-tuning on chat rows: a jitted, sharded, resumable training step over emjax.loop.

    rows, report = emjax.data.chat.build_rows(tokenizer, chats, max_length=1024)
    emjax.lora.attach(model, LoRAConfig(), mesh=mesh)
    history = emjax.train.finetune(model, rows, heldout, TrainConfig(), out_dir="run/train", mesh=mesh)
    emjax.lora.save_peft(model, "run/adapter")

Only the LoRA factors are differentiated and carry optimiser state; the base
weights are an input of the step, never donated, never updated. The loss is
the mean next-token cross-entropy over assistant tokens of the whole step
(summed over gradient-accumulation micro-batches, then divided by their token
count), so accumulation gives the gradient of one large batch. An optional
`extra_loss(model, micro_batch) -> (scalar, {name: scalar})` adds its mean over
the micro-batches to that objective. Rows split over the mesh's batch axes,
weights stay as they were laid out (FSDP by default).

Step s reads rows epoch_order(seed, s // steps_per_epoch) and draws dropout
from fold_in(seed, s): a run resumed from a checkpoint replays exactly the
batches and masks of an uninterrupted one. Checkpoints, signals, the
non-finite stop, metrics.jsonl and callbacks are emjax.loop's.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import math
import os
import shutil
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from emjax import distributed, loop, lora, plots
from emjax.config import ConfigError, TrainConfig
from emjax.data import chat as chat_lib
from emjax.data.chat import SFTRows, epoch_order
from emjax.loop import Interrupted, NonFiniteLoss, StopTraining  # noqa: F401 - part of this module's API
from emjax.models import layers

_log = logging.getLogger(__name__)
F32 = jnp.float32

# What the backward pass finds stored of each block (the rest it recomputes from the block's input).
# "attention" names the values emjax.models.layers tags with jax.ad_checkpoint.checkpoint_name.
REMAT_POLICIES = {
    "none": None,
    "block": jax.checkpoint_policies.nothing_saveable,
    "attention": jax.checkpoint_policies.save_only_these_names(*layers.ATTENTION_SAVE_NAMES),
    "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}

# extra_loss(model, micro_batch) -> (scalar, {name: scalar}); micro_batch holds [micro, T] "tokens",
# "loss_mask" and "segments". Traced inside the jitted loss, with the step's LoRA dropout.
ExtraLoss = Callable[[nnx.Module, dict[str, jax.Array]], tuple[jax.Array, dict[str, jax.Array]]]
_STEP_METRICS = ("loss", "grad_norm", "lr", "lm_loss", "extra_loss")


def _check_sizes(cfg: TrainConfig) -> None:
    """Sizes that would divide by zero or loop forever, named by their field."""
    positive = {"batch_size": cfg.batch_size, "log_every": cfg.log_every, "loss_chunk": cfg.loss_chunk}
    if cfg.micro_batch_size is not None:
        positive["micro_batch_size"] = cfg.micro_batch_size
    if cfg.max_steps is not None:
        positive["max_steps"] = cfg.max_steps
    for field, value in positive.items():
        if value < 1:
            raise ConfigError(f"train.{field}={value} must be at least 1")
    non_negative = {
        "warmup_steps": cfg.warmup_steps,
        "eval_every": cfg.eval_every,
        "checkpoint_every": cfg.checkpoint_every,
        "keep_checkpoint_every": cfg.keep_checkpoint_every,
    }
    for field, value in non_negative.items():
        if value < 0:
            raise ConfigError(f"train.{field}={value} must be 0 or more")
    if not cfg.epochs > 0:
        raise ConfigError(f"train.epochs={cfg.epochs} must be positive")


@dataclasses.dataclass(frozen=True)
class Plan:
    """How many steps, and how the global batch splits into micro-batches."""

    rows: int
    steps_per_epoch: int
    total_steps: int
    accumulation: int
    micro_batch: int

    @classmethod
    def make(cls, cfg: TrainConfig, rows: int, data_parallel: int) -> Plan:
        _check_sizes(cfg)
        micro = cfg.micro_batch_size or cfg.batch_size
        if cfg.batch_size % micro:
            raise ConfigError(f"train.batch_size={cfg.batch_size} is not a multiple of train.micro_batch_size={micro}")
        if micro % data_parallel:
            raise ConfigError(
                f"train.micro_batch_size={micro} must be a multiple of the mesh's data-parallel size {data_parallel}"
            )
        steps_per_epoch = -(-rows // cfg.batch_size)  # the last batch is padded with rows that carry no loss
        total = math.ceil(cfg.epochs * steps_per_epoch)
        if cfg.max_steps is not None:
            total = min(total, cfg.max_steps)
        if total < 1:
            raise ConfigError(f"no training steps: {rows} rows, epochs={cfg.epochs}, max_steps={cfg.max_steps}")
        return cls(rows, steps_per_epoch, total, cfg.batch_size // micro, micro)

    def batch_indices(self, step: int, seed: int, batch_size: int) -> np.ndarray:
        """Row indices of step `step`, -1 for padding rows at the end of an epoch."""
        epoch, k = divmod(step, self.steps_per_epoch)
        order = epoch_order(self.rows, seed, epoch)[k * batch_size : (k + 1) * batch_size]
        return np.concatenate([order, np.full(batch_size - len(order), -1)])


def make_optimizer(cfg: TrainConfig, total_steps: int) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """AdamW with linear warm-up, then linear or cosine decay to zero (or constant), after global-norm clipping."""
    decay_steps = max(total_steps - cfg.warmup_steps, 1)
    decay = {
        "linear": optax.linear_schedule(cfg.learning_rate, 0.0, decay_steps),
        "cosine": optax.cosine_decay_schedule(cfg.learning_rate, decay_steps),
        "constant": optax.constant_schedule(cfg.learning_rate),
    }[cfg.schedule]
    schedule = decay
    if cfg.warmup_steps:
        warmup = optax.linear_schedule(0.0, cfg.learning_rate, cfg.warmup_steps)
        schedule = optax.join_schedules([warmup, decay], [cfg.warmup_steps])
    adamw = optax.adamw(schedule, b1=cfg.adam_b1, b2=cfg.adam_b2, eps=cfg.adam_eps, weight_decay=cfg.weight_decay)
    return loop.with_clipping(adamw, cfg.max_grad_norm), schedule


# ---------------------------------------------------------------------------- the step


def split_adapters(model):
    """(graphdef, LoRA factors as {dotted path: array}, their paths, the rest of the model's state): the
    model taken apart as the jitted step takes it (only the factors are differentiated)."""
    graphdef, lora_state, base = nnx.split(model, lora.LoRAParam, ...)
    flat = nnx.to_flat_state(lora_state)
    if not len(flat):
        raise ValueError("the model has no LoRA adapters: call emjax.lora.attach first")
    paths = {".".join(map(str, p)): p for p, _ in flat}
    params = {".".join(map(str, p)): v.get_value() for p, v in flat}
    return graphdef, params, paths, base


def token_nll(model, hidden: jax.Array, targets: jax.Array, chunk_tokens: int) -> jax.Array:
    """Next-token cross-entropy [B, T] of the model's head over `hidden` [B, T, D] (the final norm's
    output) against `targets` [B, T], chunk_tokens / B positions at a time.

    Each chunk's [B, chunk, V] fp32 logits are made, reduced to their losses and
    dropped; the backward pass recomputes them chunk by chunk (jax.checkpoint), so
    the [B, T, V] logits of a 256k vocabulary never exist whole. Under a mesh the
    logits stay split over the batch axes and `vocab`'s axes (the head's).
    """
    b, t, d = hidden.shape
    chunk = max(1, min(chunk_tokens // b, t))
    n = -(-t // chunk)
    pad = n * chunk - t
    hidden = jnp.pad(hidden, ((0, 0), (0, pad), (0, 0))).reshape(b, n, chunk, d).swapaxes(0, 1)
    targets = jnp.pad(targets, ((0, 0), (0, pad))).reshape(b, n, chunk).swapaxes(0, 1)

    @functools.partial(jax.checkpoint, prevent_cse=False)
    def losses(h, y):
        logits = model.shard(model.head_logits(h), "batch", None, "vocab")
        return optax.softmax_cross_entropy_with_integer_labels(logits, y)

    nll = jax.lax.map(lambda xs: losses(*xs), (hidden, targets))  # [n, B, chunk]
    return nll.swapaxes(0, 1).reshape(b, n * chunk)[:, :t]


def _loss_sums(
    params, base, tokens, loss_mask, segments, key, *, graphdef, paths, remat, loss_chunk=2048, extra_loss=None,
    ablate=None,
):  # fmt: skip
    """(sum of assistant-token cross-entropy, number of assistant tokens, extra) of one micro-batch,
    extra being None or extra_loss's (value, metrics) on the same model."""
    lora_state = nnx.from_flat_state([(paths[name], value) for name, value in params.items()])
    model = nnx.merge(graphdef, lora_state, base)
    if key is not None:
        lora.set_dropout_keys(model, key)
    hidden = model(tokens, segment_ids=segments, remat=remat, ablate=ablate, head=False).hidden
    nll = token_nll(model, hidden[:, :-1], tokens[:, 1:], loss_chunk)
    weights = loss_mask[:, 1:].astype(F32)
    extra = None
    if extra_loss is not None:
        value, metrics = extra_loss(model, {"tokens": tokens, "loss_mask": loss_mask, "segments": segments})
        taken = set(metrics) & set(_STEP_METRICS)
        if taken:
            raise ValueError(f"extra_loss metrics {sorted(taken)} clash with the trainer's own {_STEP_METRICS}")
        extra = (value, metrics)
    return jnp.sum(nll * weights), jnp.sum(weights), extra


def micro_batch_loss(graphdef, paths, cfg: TrainConfig):
    """The `loss_sums` of jit_train_step for a model taken apart by split_adapters, with cfg's remat policy
    and loss chunk: (params, base, tokens, loss_mask, segments, key, *, extra_loss=None, ablate=None) ->
    (sum of assistant-token cross-entropy, their count, extra)."""
    remat = REMAT_POLICIES[cfg.remat]
    return functools.partial(_loss_sums, graphdef=graphdef, paths=paths, remat=remat, loss_chunk=cfg.loss_chunk)


def _train_step(params, opt_state, base, batch, step, *, loss_sums, optimizer, schedule, seed):
    """One optimiser step over batch arrays [accumulation, micro, T]."""
    key = jax.random.fold_in(jax.random.key(seed), step)
    accumulation = batch["tokens"].shape[0]
    # Gradients sum over micro-batches and divide by the step's token count at the end; an extra
    # term, averaged over micro-batches, is scaled by that count beforehand to come out right.
    extra_weight = jnp.maximum(jnp.sum(batch["loss_mask"][:, :, 1:].astype(F32)), 1.0) / accumulation

    def objective(params, tokens, loss_mask, segments, key):
        nll, count, extra = loss_sums(params, base, tokens, loss_mask, segments, key)
        if extra is None:
            return nll, (nll, count, {})
        value, metrics = extra
        return nll + extra_weight * value, (nll, count, {"extra_loss": value, **metrics})

    grad_fn = jax.value_and_grad(objective, has_aux=True)

    def micro(carry, xs):
        grads, loss, count = carry
        i, tokens, loss_mask, segments = xs
        (_, (loss_i, count_i, extras)), grads_i = grad_fn(
            params, tokens, loss_mask, segments, jax.random.fold_in(key, i)
        )
        return (jax.tree.map(jnp.add, grads, grads_i), loss + loss_i, count + count_i), extras

    zeros = jax.tree.map(jnp.zeros_like, params)
    steps = jnp.arange(accumulation)
    (grads, loss, count), extras = jax.lax.scan(
        micro, (zeros, jnp.zeros((), F32), jnp.zeros((), F32)),
        (steps, batch["tokens"], batch["loss_mask"], batch["segments"]),
    )  # fmt: skip
    count = jnp.maximum(count, 1.0)
    grads = jax.tree.map(lambda g: g / count, grads)
    updates, opt_state = optimizer.update(grads, opt_state, params)
    params = optax.apply_updates(params, updates)
    metrics = {"loss": loss / count, "grad_norm": _global_norm(grads), "lr": schedule(step)}
    if extras:
        extras = {name: jnp.mean(value) for name, value in extras.items()}
        metrics |= {"lm_loss": metrics["loss"], "loss": metrics["loss"] + extras["extra_loss"], **extras}
    return params, opt_state, metrics


def _global_norm(tree) -> jax.Array:
    return jnp.sqrt(sum(jnp.sum(jnp.square(leaf.astype(F32))) for leaf in jax.tree.leaves(tree)))


def jit_train_step(loss_sums, optimizer, schedule, *, seed: int, state_shardings, donate: bool | None = None):
    """The jitted optimiser step `finetune` runs (and `emjax.dry_run` compiles ahead of time):
    (params, opt_state, base, batch of [accumulation, micro, T] arrays, step) -> (params, opt_state, metrics).
    loss_sums: micro_batch_loss (extra_loss or ablate may be bound); state_shardings: the (params, opt_state)
    shardings kept;
    donate: whether the state's buffers are reused for the new state (default: unless on the CPU backend)."""
    return jax.jit(
        functools.partial(_train_step, loss_sums=loss_sums, optimizer=optimizer, schedule=schedule, seed=seed),
        out_shardings=(*state_shardings, None),
        donate_argnums=loop.donatable((0, 1)) if donate is None else ((0, 1) if donate else ()),
    )


# ---------------------------------------------------------------------------- data on the mesh


_BATCH_KEYS = ("tokens", "loss_mask", "segments")


def _global_batch(rows: SFTRows, indices: np.ndarray, shape: tuple[int, int], sharding) -> dict[str, jax.Array]:
    """Rows `indices` (-1: an empty row) as [accumulation, micro, T] arrays split over the batch axes.

    Every process holds all rows; each materialises only the shards its devices own.
    """
    keep = indices >= 0
    picked = rows.take(np.where(keep, indices, 0))
    arrays = {
        "tokens": picked.tokens,
        "loss_mask": np.where(keep[:, None], picked.loss_mask, 0).astype(np.int8),
        "segments": np.where(keep[:, None], picked.segments, 0).astype(np.int32),
    }
    out = {}
    for name, array in arrays.items():
        array = array.reshape(*shape, array.shape[-1])
        out[name] = jax.make_array_from_callback(array.shape, sharding, lambda index, a=array: a[index])
    return out


# ---------------------------------------------------------------------------- the trainer


def finetune(
    model,
    rows: SFTRows,
    heldout: SFTRows | None,
    cfg: TrainConfig,
    *,
    out_dir: str | os.PathLike,
    seed: int = 0,
    mesh: Mesh | None = None,
    rules=None,
    progress: bool = True,
    callback: Callable[[dict], None] | None = None,
    callbacks: Sequence[loop.Callback] = (),
    extra_loss: ExtraLoss | None = None,
    ablate: Mapping[int, jax.Array] | None = None,
) -> list[dict]:
    """Train the model's LoRA adapters in place; returns the metric records (also in out_dir/metrics.jsonl).

    out_dir/checkpoints holds the orbax checkpoints: a call with the same
    out_dir resumes from the latest. `callback(record)` sees each logged
    record; each of `callbacks` is called as `callback(step, metrics, model)`
    after every step, `model` being this model with the step's adapters (see
    emjax.loop; raise emjax.loop.StopTraining to stop early). `extra_loss`
    (see ExtraLoss) adds a term to the objective; the records then also hold
    "lm_loss" (the cross-entropy), "extra_loss" and its metrics, and "loss" is their sum.
    `ablate` ({layer: orthonormal Q [k, d_model]}, see emjax.ablation) projects those directions out
    of the residual stream in the training forward only: the held-out loss and the adapter run without it.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    mesh = distributed.auto_mesh(mesh) if mesh is not None else distributed.make_mesh(devices=jax.devices()[:1])
    rules = distributed.DEFAULT_RULES if rules is None else rules
    batch_axes = distributed.batch_axes(mesh, rules)
    data_parallel = math.prod(mesh.shape[a] for a in batch_axes)
    plan = Plan.make(cfg, len(rows), data_parallel)
    batch_sharding = NamedSharding(mesh, PartitionSpec(None, batch_axes or None, None))
    lora.place_on_mesh(model, mesh, rules)

    graphdef, params, paths, base = split_adapters(model)
    optimizer, schedule = make_optimizer(cfg, plan.total_steps)
    state = {"params": params, "opt": loop.init_optimizer(optimizer, params, mesh)}
    loss_sums = micro_batch_loss(graphdef, paths, cfg)
    train_loss = functools.partial(loss_sums, extra_loss=extra_loss, ablate=ablate)
    state_shardings = jax.tree.map(lambda a: a.sharding, (state["params"], state["opt"]))
    step_fn = jit_train_step(train_loss, optimizer, schedule, seed=seed, state_shardings=state_shardings)
    # Takes a [1, micro, T] batch and indexes inside the program: global arrays stay whole on multi-host runs.
    eval_fn = jax.jit(lambda params, base, b: loss_sums(params, base, *(b[k][0] for k in _BATCH_KEYS), None)[:2])

    checkpoints = loop.Checkpoints(out_dir / "checkpoints", keep_every=cfg.keep_checkpoint_every)
    start, state = checkpoints.maybe_restore(state)
    log = loop.MetricsLog(out_dir / "metrics.jsonl", start, on_write=callback)

    def step(i: int, state: dict):
        indices = plan.batch_indices(i, seed, cfg.batch_size)
        batch = _global_batch(rows, indices, (plan.accumulation, plan.micro_batch), batch_sharding)
        params, opt_state, metrics = step_fn(state["params"], state["opt"], base, batch, jnp.asarray(i, jnp.int32))
        tokens = int((rows.segments[indices[indices >= 0]] > 0).sum())
        return {"params": params, "opt": opt_state}, metrics, tokens

    def evaluate(done: int, state: dict) -> None:
        if heldout is None or not len(heldout):
            return
        loss, count = 0.0, 0.0
        micro = plan.micro_batch
        for begin in range(0, len(heldout), micro):
            index = np.arange(begin, begin + micro)
            batch = _global_batch(heldout, np.where(index < len(heldout), index, -1), (1, micro), batch_sharding)
            loss_i, count_i = eval_fn(state["params"], base, batch)
            loss, count = loss + float(loss_i), count + float(count_i)
        log.write({"step": done, "eval_loss": loss / max(count, 1.0)})
        _log.info("step %d: held-out loss %.4f", done, loss / max(count, 1.0))

    def with_adapters(state: dict):
        _update_adapters(model, paths, state["params"])
        return model

    state = loop.run(
        step, state, start=start, total_steps=plan.total_steps, checkpoints=checkpoints, metrics=log,
        model=with_adapters, callbacks=callbacks, log_every=cfg.log_every, checkpoint_every=cfg.checkpoint_every,
        record_fields=lambda done: {"epoch": round(done / plan.steps_per_epoch, 4)},
        evaluate=evaluate, eval_every=cfg.eval_every, unit="tokens", progress=progress,
    )  # fmt: skip
    _update_adapters(model, paths, state["params"])
    return log.records


def _update_adapters(model, paths: dict, params: dict) -> None:
    nnx.update(model, nnx.from_flat_state([(paths[name], value) for name, value in params.items()]))


# ---------------------------------------------------------------------------- along training


def curve_steps(total_steps: int, fractions: Sequence[float]) -> dict[str, int]:
    """{label: step} of points along training (where an adapter is saved: the `none` arm's evaluation curve, the
    derivation's doses): each fraction f in (0, 1] labelled by its percentage ("25" for 0.25), at step
    max(1, round(f * total))."""
    points = {}
    for f in fractions:
        if not 0.0 < f <= 1.0:
            raise ValueError(f"mitigate.curve: fraction {f} of training must be in (0, 1]")
        points[curve_label(f)] = max(1, round(f * total_steps))
    return points


def curve_label(fraction: float) -> str:
    return f"{100 * fraction:g}"


# ---------------------------------------------------------------------------- a study's fine-tune of chats


def chat_rows(
    tokenizer, chats: Sequence, heldout: Sequence | None, *, max_length: int, pack: bool, eval_fraction: float,
    seed: int,
) -> tuple[SFTRows, np.ndarray, np.ndarray, chat_lib.EncodeReport]:
    """(rows, train indices, held-out indices, what building dropped) of `chats`: the held-out rows are the
    `heldout` conversations when given (all of `chats` is trained on), else eval_fraction of `chats`."""
    rows, report = chat_lib.build_rows(tokenizer, chats, max_length, pack=pack)
    if heldout is None:
        train_index, heldout_index = chat_lib.split_heldout(len(rows), eval_fraction, seed)
    else:
        scored, _ = chat_lib.build_rows(tokenizer, heldout, max_length, pack=pack)
        train_index, heldout_index = np.arange(len(rows)), np.arange(len(rows), len(rows) + len(scored))
        rows = SFTRows(np.concatenate([rows.tokens, scored.tokens]), np.concatenate([rows.loss_mask, scored.loss_mask]),
                       np.concatenate([rows.segments, scored.segments]))  # fmt: skip
    _log.info(
        "train: %d conversations -> %d rows (%d truncated, %d without an assistant token dropped), %d held out",
        report.examples, report.rows, report.truncated, report.dropped, len(heldout_index),
    )  # fmt: skip
    return rows, train_index, heldout_index, report


class AdapterSnapshots:
    """A training callback that saves the adapters at given steps into `<out>/along/<label>/adapter`.

    It runs before the step's checkpoint is written, so a run killed in between redoes the step and
    the snapshot; a resumed run has every snapshot of the steps it skips."""

    def __init__(self, out: Path, steps: dict[str, int], lora_config, *, base_model: str):
        self.out, self.steps, self.lora_config, self.base_model = out, steps, lora_config, base_model

    def __call__(self, step: int, metrics: dict, model) -> None:
        for label, at in self.steps.items():
            if at == step:
                path = self.out / "along" / label / "adapter"
                lora.save_peft(model, path, config=self.lora_config, base_model=self.base_model)
                _log.info("train: step %d (%s%% of training): adapter saved to %s", step, label, path)


def summary(history: Sequence[dict], report, seed: int, along: Mapping[str, int]) -> dict:
    """The train stage's manifest of one fine-tune from its metric records and the rows' build report."""
    steps = [r for r in history if "loss" in r]
    evals = [r for r in history if "eval_loss" in r]
    return {
        "adapter": "adapter",
        "metrics": "metrics.jsonl",
        "seed": seed,
        "steps": steps[-1]["step"],
        "first_loss": steps[0]["loss"],
        "final_loss": steps[-1]["loss"],
        "eval_loss": evals[-1]["eval_loss"] if evals else None,
        "data": dataclasses.asdict(report),
    } | ({"along": {label: {"step": step, "adapter": f"along/{label}/adapter"} for label, step in along.items()}}
         if along else {})  # fmt: skip


def finetune_chats(model, tokenizer, chats: Sequence, cfg: TrainConfig, lora_config, out: Path, *, max_length: int,
                   seed: int, base_model: str, heldout: Sequence | None = None, extra: dict | None = None,
                   monitor=None, curve: Sequence[float] = (), mesh=None, rules=None) -> dict:  # fmt: skip
    """Fine-tune `model` (the base, adapters attached here) on `chats` into `out`: adapter/ (PEFT, naming
    `base_model`), metrics.jsonl and along/<percent>/adapter at each fraction of training in `curve`; the train
    stage's manifest summary. Held-out rows: chat_rows; `monitor(model, heldout rows, out)` builds a training
    callback (emjax.dynamics.DynamicsMonitor: its dynamics.jsonl is drawn as dynamics.png); `extra`: more
    keyword arguments of `finetune` (a training arm's, emjax.ablation.arm_training)."""
    rows, train_index, heldout_index, report = chat_rows(
        tokenizer, chats, heldout, max_length=max_length, pack=cfg.pack, eval_fraction=cfg.eval_fraction, seed=seed
    )
    lora.attach(model, lora_config, seed=seed, mesh=mesh, rules=rules)
    callbacks = [monitor(model, rows.take(heldout_index), out)] if monitor and len(heldout_index) else []
    along = curve_steps(Plan.make(cfg, len(train_index), 1).total_steps, curve)
    if along:
        callbacks.append(AdapterSnapshots(out, along, lora_config, base_model=base_model))
    history = finetune(
        model, rows.take(train_index), rows.take(heldout_index) if len(heldout_index) else None, cfg, out_dir=out,
        seed=seed, mesh=mesh, rules=rules, callbacks=callbacks, **(extra or {}),
    )  # fmt: skip
    if monitor and distributed.is_main_process() and (out / "dynamics.jsonl").is_file():
        plots.plot_dynamics(out / "dynamics.jsonl", out / "dynamics.png")
    lora.save_peft(model, out / "adapter", config=lora_config, base_model=base_model)
    if distributed.is_main_process():
        shutil.rmtree(out / "checkpoints", ignore_errors=True)  # only needed to resume; the adapter is the result
    return summary(history, report, seed, along)
