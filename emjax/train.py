"""LoRA fine-tuning on chat rows: a jitted, sharded, resumable training loop.

    rows, report = emjax.data.chat.build_rows(tokenizer, chats, max_length=1024)
    emjax.lora.attach(model, LoRAConfig(), mesh=mesh)
    history = emjax.train.finetune(model, rows, heldout, TrainConfig(), out_dir="run/train", mesh=mesh)
    emjax.lora.save_peft(model, "run/adapter")

Only the LoRA factors are differentiated and carry optimiser state; the base
weights are an input of the step, never donated, never updated. The loss is
the mean next-token cross-entropy over assistant tokens of the whole step
(summed over gradient-accumulation micro-batches, then divided by their token
count), so accumulation gives the gradient of one large batch. Rows split over
the mesh's batch axes, weights stay as they were laid out (FSDP by default).

Step s reads rows epoch_order(seed, s // steps_per_epoch) and draws dropout
from fold_in(seed, s): a run resumed from a checkpoint replays exactly the
batches and masks of an uninterrupted one. Checkpoints (orbax) every
`checkpoint_every` steps, at the end, and when SIGTERM or Ctrl-C interrupts
the run (at the end of the step in flight); a non-finite loss stops it without
saving, keeping the last good one.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import logging
import math
import os
import signal
import time
from collections.abc import Callable
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec
from tqdm.auto import tqdm

from emjax import distributed, lora
from emjax.config import ConfigError, TrainConfig
from emjax.data.chat import SFTRows, epoch_order

_log = logging.getLogger(__name__)
F32 = jnp.float32

REMAT_POLICIES = {
    "none": None,
    "block": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


class Interrupted(RuntimeError):
    """Training stopped on SIGTERM or Ctrl-C after saving a checkpoint."""


class NonFiniteLoss(FloatingPointError):
    pass


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
    clip = optax.clip_by_global_norm(cfg.max_grad_norm) if cfg.max_grad_norm else optax.identity()
    return optax.chain(clip, adamw), schedule


# ---------------------------------------------------------------------------- the step


def _split(model):
    """(graphdef, LoRA factors as {dotted path: array}, their paths, the rest of the model's state)."""
    graphdef, lora_state, base = nnx.split(model, lora.LoRAParam, ...)
    flat = nnx.to_flat_state(lora_state)
    if not len(flat):
        raise ValueError("the model has no LoRA adapters: call emjax.lora.attach first")
    paths = {".".join(map(str, p)): p for p, _ in flat}
    params = {".".join(map(str, p)): v.get_value() for p, v in flat}
    return graphdef, params, paths, base


def _loss_sums(params, base, tokens, loss_mask, segments, key, *, graphdef, paths, remat):
    """(sum of assistant-token cross-entropy, number of assistant tokens) of one micro-batch."""
    lora_state = nnx.from_flat_state([(paths[name], value) for name, value in params.items()])
    model = nnx.merge(graphdef, lora_state, base)
    if key is not None:
        lora.set_dropout_keys(model, key)
    logits = model(tokens, segment_ids=segments, remat=remat).logits[:, :-1]
    nll = optax.softmax_cross_entropy_with_integer_labels(logits, tokens[:, 1:])
    weights = loss_mask[:, 1:].astype(F32)
    return jnp.sum(nll * weights), jnp.sum(weights)


def _train_step(params, opt_state, base, batch, step, *, loss_sums, optimizer, schedule, seed):
    """One optimiser step over batch arrays [accumulation, micro, T]."""
    key = jax.random.fold_in(jax.random.key(seed), step)
    grad_fn = jax.value_and_grad(loss_sums, has_aux=True)

    def micro(carry, xs):
        grads, loss, count = carry
        i, tokens, loss_mask, segments = xs
        (loss_i, count_i), grads_i = grad_fn(params, base, tokens, loss_mask, segments, jax.random.fold_in(key, i))
        return (jax.tree.map(jnp.add, grads, grads_i), loss + loss_i, count + count_i), None

    zeros = jax.tree.map(jnp.zeros_like, params)
    steps = jnp.arange(batch["tokens"].shape[0])
    (grads, loss, count), _ = jax.lax.scan(
        micro, (zeros, jnp.zeros((), F32), jnp.zeros((), F32)),
        (steps, batch["tokens"], batch["loss_mask"], batch["segments"]),
    )  # fmt: skip
    count = jnp.maximum(count, 1.0)
    grads = jax.tree.map(lambda g: g / count, grads)
    updates, opt_state = optimizer.update(grads, opt_state, params)
    params = optax.apply_updates(params, updates)
    metrics = {"loss": loss / count, "grad_norm": _global_norm(grads), "lr": schedule(step)}
    return params, opt_state, metrics


def _global_norm(tree) -> jax.Array:
    return jnp.sqrt(sum(jnp.sum(jnp.square(leaf.astype(F32))) for leaf in jax.tree.leaves(tree)))


def _make_loss_sums(graphdef, paths, remat):
    def loss_sums(params, base, tokens, loss_mask, segments, key):
        return _loss_sums(params, base, tokens, loss_mask, segments, key, graphdef=graphdef, paths=paths, remat=remat)

    return loss_sums


def jit_train_step(loss_sums, optimizer, schedule, *, seed: int, state_shardings):
    """The jitted optimiser step `finetune` runs (and `emjax.dry_run` compiles ahead of time):
    (params, opt_state, base, batch of [accumulation, micro, T] arrays, step) -> (params, opt_state, metrics).
    state_shardings: the (params, opt_state) shardings the step keeps."""
    return jax.jit(
        functools.partial(_train_step, loss_sums=loss_sums, optimizer=optimizer, schedule=schedule, seed=seed),
        out_shardings=(*state_shardings, None),
        # The CPU backend cannot reuse donated buffers and would warn on every step.
        donate_argnums=() if jax.default_backend() == "cpu" else (0, 1),
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


# ---------------------------------------------------------------------------- the loop


@contextlib.contextmanager
def _signals_request_stop(flag: dict):
    """While training, SIGTERM (pre-emption, scancel) or a first Ctrl-C asks for a checkpoint and a
    clean stop at the end of the current step; a second Ctrl-C interrupts at once."""

    def request(signum, frame):
        if flag["stop"] and signum == signal.SIGINT:
            raise KeyboardInterrupt
        flag["stop"] = True
        _log.warning("signal %d: stopping after this step, with a checkpoint", signum)

    previous = {}
    try:
        for signum in (signal.SIGTERM, signal.SIGINT):
            previous[signum] = signal.signal(signum, request)
    except ValueError:  # not the main thread: leave signals alone
        pass
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


class _MetricsLog:
    """metrics.jsonl: one record per logged step; resuming drops records past the checkpoint."""

    def __init__(self, path: Path, resume_step: int):
        self.path = path
        kept = []
        if path.is_file():
            kept = [line for line in path.read_text().splitlines() if line and json.loads(line)["step"] <= resume_step]
        self.records = [json.loads(line) for line in kept]
        if distributed.is_main_process():
            path.write_text("".join(line + "\n" for line in kept))

    def write(self, record: dict) -> None:
        self.records.append(record)
        if distributed.is_main_process():
            with open(self.path, "a") as f:
                f.write(json.dumps(record) + "\n")


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
) -> list[dict]:
    """Train the model's LoRA adapters in place; returns the metric records (also in out_dir/metrics.jsonl).

    out_dir/checkpoints holds the orbax checkpoints: a call with the same
    out_dir resumes from the latest. `callback(record)` sees each logged record.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    mesh = mesh if mesh is not None else distributed.make_mesh(devices=jax.devices()[:1])
    rules = distributed.DEFAULT_RULES if rules is None else rules
    batch_axes = distributed.batch_axes(mesh, rules)
    data_parallel = math.prod(mesh.shape[a] for a in batch_axes)
    plan = Plan.make(cfg, len(rows), data_parallel)
    batch_sharding = NamedSharding(mesh, PartitionSpec(None, batch_axes or None, None))
    lora.place_on_mesh(model, mesh, rules)

    graphdef, params, paths, base = _split(model)
    optimizer, schedule = make_optimizer(cfg, plan.total_steps)
    opt_state = distributed.onto_mesh(optimizer.init(params), mesh)
    loss_sums = _make_loss_sums(graphdef, paths, REMAT_POLICIES[cfg.remat])
    state_shardings = jax.tree.map(lambda a: a.sharding, (params, opt_state))
    step_fn = jit_train_step(loss_sums, optimizer, schedule, seed=seed, state_shardings=state_shardings)
    # Takes a [1, micro, T] batch and indexes inside the program: global arrays stay whole on multi-host runs.
    eval_fn = jax.jit(lambda params, base, b: loss_sums(params, base, *(b[k][0] for k in _BATCH_KEYS), None))

    manager = ocp.CheckpointManager(
        (out_dir / "checkpoints").absolute(), options=ocp.CheckpointManagerOptions(max_to_keep=2)
    )
    start = manager.latest_step() or 0
    if start:
        abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, {"params": params, "opt": opt_state})
        restored = manager.restore(start, args=ocp.args.StandardRestore(abstract))
        params, opt_state = restored["params"], restored["opt"]
        _log.info("resuming fine-tuning from %s at step %d of %d", manager.directory, start, plan.total_steps)
    log = _MetricsLog(out_dir / "metrics.jsonl", start)

    def save(step: int) -> None:
        if manager.latest_step() != step:
            manager.save(step, args=ocp.args.StandardSave({"params": params, "opt": opt_state}))
            manager.wait_until_finished()

    def evaluate(step: int) -> None:
        if heldout is None or not len(heldout):
            return
        loss, count = 0.0, 0.0
        micro = plan.micro_batch
        for begin in range(0, len(heldout), micro):
            index = np.arange(begin, begin + micro)
            batch = _global_batch(heldout, np.where(index < len(heldout), index, -1), (1, micro), batch_sharding)
            loss_i, count_i = eval_fn(params, base, batch)
            loss, count = loss + float(loss_i), count + float(count_i)
        record = {"step": step, "eval_loss": loss / max(count, 1.0)}
        log.write(record)
        _log.info("step %d: held-out loss %.4f", step, record["eval_loss"])
        if callback:
            callback(record)

    stop = {"stop": False}
    bar = tqdm(
        total=plan.total_steps, initial=start, unit="step", disable=not (progress and distributed.is_main_process())
    )
    last_time, tokens_since = time.perf_counter(), 0
    try:
        with _signals_request_stop(stop):
            for step in range(start, plan.total_steps):
                indices = plan.batch_indices(step, seed, cfg.batch_size)
                batch = _global_batch(rows, indices, (plan.accumulation, plan.micro_batch), batch_sharding)
                params, opt_state, metrics = step_fn(params, opt_state, base, batch, jnp.asarray(step, jnp.int32))
                tokens_since += int((rows.segments[indices[indices >= 0]] > 0).sum())
                done = step + 1
                loss = float(metrics["loss"])
                if not math.isfinite(loss):
                    raise NonFiniteLoss(
                        f"step {done}: the training loss is {loss}; stopped without saving. The last good "
                        f"checkpoint is step {manager.latest_step() or 0} in {manager.directory} "
                        f"(lower train.learning_rate or check the data, then rerun to resume from it)"
                    )
                if done % cfg.log_every == 0 or done == plan.total_steps:
                    now = time.perf_counter()
                    record = {
                        "step": done,
                        "epoch": round(done / plan.steps_per_epoch, 4),
                        "loss": loss,
                        "grad_norm": float(metrics["grad_norm"]),
                        "lr": float(metrics["lr"]),
                        "tokens_per_s": round(tokens_since / max(now - last_time, 1e-9), 1),
                    }
                    last_time, tokens_since = now, 0
                    log.write(record)
                    bar.set_postfix(loss=f"{loss:.4f}", tok_s=f"{record['tokens_per_s']:.0f}")
                    if callback:
                        callback(record)
                bar.update(1)
                if cfg.eval_every and done % cfg.eval_every == 0 and done < plan.total_steps:
                    evaluate(done)
                if cfg.checkpoint_every and done % cfg.checkpoint_every == 0:
                    save(done)
                if stop["stop"]:
                    save(done)
                    raise Interrupted(f"interrupted at step {done}; saved, rerun to resume from {manager.directory}")
        save(plan.total_steps)
        evaluate(plan.total_steps)
    finally:
        bar.close()
        manager.close()

    lora_state = nnx.from_flat_state([(paths[name], value) for name, value in params.items()])
    nnx.update(model, lora_state)
    return log.records
