"""One training loop for every trainer (LoRA fine-tuning, SAE training, the mitigation arms).

    checkpoints = loop.Checkpoints(out_dir / "checkpoints", keep_every=100)   # or None: saves nothing
    start, state = checkpoints.maybe_restore(state)
    state = loop.run(step, state, start=start, total_steps=n, checkpoints=checkpoints,
                     metrics=loop.MetricsLog(out_dir / "metrics.jsonl", start), ...)

A trainer supplies `step(i, state) -> (state, metrics, amount)`: optimiser step
i (0-based) on the batch that step i reads, whatever it is (the step index, not
the call count, picks the batch and any random key, so a resumed run replays
exactly the batches and masks of an uninterrupted one). The loop saves every
`checkpoint_every` steps and at the end; SIGTERM or a first Ctrl-C saves at the
end of the step in flight and raises Interrupted; a non-finite loss raises
NonFiniteLoss without saving, keeping the last good checkpoint. Callbacks see
every step:

    callback(step: int, metrics: dict[str, float], model) -> None

with `step` the number of steps done, `metrics` that step's values and `model`
the live nnx module (valid until the next step); one may raise
StopTraining(reason) to end the run early: the loop writes {"step": step,
"stopped": reason} to metrics.jsonl, ends as if that step were the last
(checkpoint, final evaluation) and returns normally.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import math
import os
import shutil
import signal
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import jax
import optax
import orbax.checkpoint as ocp
from tqdm.auto import tqdm

from emjax import artifacts, distributed

_log = logging.getLogger(__name__)

Callback = Callable[[int, dict[str, float], Any], None]


class StopTraining(Exception):  # noqa: N818 - a request, not an error
    """Raised by a callback to end training early, with a checkpoint; the reason goes to metrics.jsonl."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


class Interrupted(RuntimeError):
    """Training stopped on SIGTERM or Ctrl-C after saving a checkpoint."""


class NonFiniteLoss(FloatingPointError):
    pass


def with_clipping(optimizer: optax.GradientTransformation, max_norm: float | None) -> optax.GradientTransformation:
    """`optimizer` after global-norm gradient clipping (none when max_norm is None or 0)."""
    return optax.chain(optax.clip_by_global_norm(max_norm), optimizer) if max_norm else optimizer


def init_optimizer(optimizer: optax.GradientTransformation, params, mesh):
    """The optimiser state of `params`, laid out on the mesh like them (scalars replicated)."""
    return distributed.onto_mesh(optimizer.init(params), mesh)


def donatable(argnums: tuple[int, ...]) -> tuple[int, ...]:
    """`argnums` to donate to a jitted step; none on CPU, whose backend cannot reuse them and warns each step."""
    return () if jax.default_backend() == "cpu" else argnums


class Checkpoints:
    """Orbax checkpoints of one training state in `directory`, or nothing at all when it is None.

    Keeps the `max_to_keep` latest, and also every step divisible by `keep_every` (0: none).
    Saves are synchronous: a returned save() is on disk, whatever happens next.
    """

    def __init__(self, directory: str | os.PathLike | None, *, max_to_keep: int = 2, keep_every: int = 0):
        if keep_every < 0:
            raise ValueError(f"keep_every={keep_every} must be >= 0")
        self.directory = None if directory is None else Path(directory).absolute()
        self._manager = None
        if self.directory is not None:
            options = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, keep_period=keep_every or None)
            self._manager = ocp.CheckpointManager(self.directory, options=options)

    def latest_step(self) -> int:
        """The step of the newest checkpoint; 0 when there is none."""
        return (self._manager.latest_step() or 0) if self._manager else 0

    def all_steps(self) -> list[int]:
        return sorted(self._manager.all_steps()) if self._manager else []

    def maybe_restore(self, state):
        """(latest step, the state saved there) or (0, `state`): `state` gives the structure, shardings and dtypes."""
        step = self.latest_step()
        if not step:
            return 0, state
        abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, state)
        _log.info("resuming from %s at step %d", self.directory, step)
        return step, self._manager.restore(step, args=ocp.args.StandardRestore(abstract))

    def save(self, step: int, state) -> None:
        """Save `state` as step `step` (once: a second save of the latest step does nothing).

        A full disk is an OSError(ENOSPC) naming the directory and the last good checkpoint,
        which stays as it was (the half-written step is removed); a rerun resumes from it."""
        if self._manager is None or self._manager.latest_step() == step:
            return
        quiet = _DropDiskFull()  # orbax's writer threads log each failure with its traceback: raised once below
        logging.getLogger("absl").addFilter(quiet)
        try:
            self._manager.save(step, args=ocp.args.StandardSave(state))
            self._manager.wait_until_finished()
        except Exception as e:
            code = _disk_full(e)
            if code is None:
                raise
            for partial in self.directory.glob(f"{step}.orbax-checkpoint-tmp*"):
                shutil.rmtree(partial, ignore_errors=True)
            raise OSError(
                code, f"{os.strerror(code)} while writing checkpoint step {step} to {self.directory}: free space there "
                f"and rerun to resume. {self.describe()}",
            ) from None  # fmt: skip
        finally:
            logging.getLogger("absl").removeFilter(quiet)

    def describe(self) -> str:
        """Where the last good state is, for messages."""
        if self._manager is None:
            return "No checkpoint directory was given, so nothing was saved"
        if not self.latest_step():
            return f"No checkpoint was saved yet in {self.directory}"
        return f"The last good checkpoint is step {self.latest_step()} in {self.directory}"

    def close(self) -> None:
        if self._manager is not None:
            self._manager.close()


_DISK_FULL = (errno.ENOSPC, errno.EDQUOT)


def _disk_full(error: BaseException) -> int | None:
    """ENOSPC or EDQUOT when `error` or anything it was raised from is a full disk (tensorstore reports
    one as a ValueError "RESOURCE_EXHAUSTED: ... [os_error_code='28']"), else None."""
    seen, todo = set(), [error]
    while todo:
        e = todo.pop()
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        if isinstance(e, OSError) and e.errno in _DISK_FULL:
            return e.errno
        for code in _DISK_FULL:
            if f"os_error_code='{code}'" in str(e) or os.strerror(code) in str(e):
                return code
        todo += [e.__cause__, e.__context__, *getattr(e, "exceptions", ())]
    return None


class _DropDiskFull(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        error = record.exc_info[1] if record.exc_info else None
        return _disk_full(error) is None and not any(os.strerror(c) in record.getMessage() for c in _DISK_FULL)


class MetricsLog:
    """metrics.jsonl (or only memory, when `path` is None): one JSON record per logged step.

    Resuming at `resume_step` drops the records past it. `on_write(record)` sees every record.
    """

    def __init__(self, path: str | os.PathLike | None, resume_step: int = 0, on_write=None):
        self.path = None if path is None else Path(path)
        self.on_write = on_write
        kept = []
        if self.path is not None and self.path.is_file():
            kept = [
                line for line in self.path.read_text().splitlines() if line and json.loads(line)["step"] <= resume_step
            ]
        self.records = [json.loads(line) for line in kept]
        if self.path is not None and distributed.is_main_process():
            artifacts.write_text(self.path, "".join(line + "\n" for line in kept))

    def write(self, record: dict) -> None:
        self.records.append(record)
        if self.path is not None and distributed.is_main_process():
            try:
                with open(self.path, "a") as f:
                    f.write(artifacts.dumps(record) + "\n")
            except OSError as e:
                raise OSError(e.errno, f"cannot write {self.path}: {e.strerror or e}") from None
        if self.on_write is not None:
            self.on_write(record)


@contextlib.contextmanager
def signals_request_stop(flag: dict):
    """While training, SIGTERM (pre-emption, scancel) or a first Ctrl-C sets flag["stop"], asking for a
    checkpoint and a clean stop at the end of the current step; a second Ctrl-C interrupts at once."""

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


def run(
    step: Callable[[int, Any], tuple[Any, dict, int]],
    state,
    *,
    start: int,
    total_steps: int,
    checkpoints: Checkpoints,
    metrics: MetricsLog,
    model: Callable[[Any], Any],
    callbacks: Sequence[Callback] = (),
    log_every: int = 1,
    checkpoint_every: int = 0,
    record_fields: Callable[[int], dict] = lambda done: {},
    evaluate: Callable[[int, Any], None] | None = None,
    eval_every: int = 0,
    unit: str = "samples",
    progress: bool = True,
):
    """Steps start .. total_steps - 1 of `step` from `state`; returns the final state.

    `step(i, state)` returns (new state, metrics as scalars with a "loss", the
    number of `unit`s it processed). Every `log_every` steps (and the last) a
    record {"step", **record_fields(done), **metrics, "<unit>_per_s"} goes to
    `metrics`. `model(state)` builds the live module callbacks receive (only
    when there are callbacks). `evaluate(done, state)` runs every `eval_every`
    steps and once at the end.
    """
    stop = {"stop": False}
    bar = tqdm(total=total_steps, initial=start, unit="step", disable=not (progress and distributed.is_main_process()))
    last_time, amount_since, done = time.perf_counter(), 0, start
    try:
        with signals_request_stop(stop):
            for i in range(start, total_steps):
                state, values, amount = step(i, state)
                values = {name: float(v) for name, v in jax.device_get(values).items()}
                amount_since += amount
                done = i + 1
                if not math.isfinite(values["loss"]):
                    raise NonFiniteLoss(
                        f"step {done}: the training loss is {values['loss']}; stopped without saving. "
                        f"{checkpoints.describe()} (lower the learning rate or check the data, "
                        "then rerun to resume from it)"
                    )
                if done % log_every == 0 or done == total_steps:
                    now = time.perf_counter()
                    rate = round(amount_since / max(now - last_time, 1e-9), 1)
                    last_time, amount_since = now, 0
                    metrics.write({"step": done, **record_fields(done), **values, f"{unit}_per_s": rate})
                    bar.set_postfix({"loss": f"{values['loss']:.4g}", f"{unit}/s": f"{rate:.0f}"})
                bar.update(1)
                try:
                    if callbacks:
                        live = model(state)
                        for callback in callbacks:
                            callback(done, values, live)
                except StopTraining as request:
                    _log.info("step %d: training stopped by a callback: %s", done, request.reason)
                    metrics.write({"step": done, "stopped": request.reason})
                    break
                if evaluate is not None and eval_every and done % eval_every == 0 and done < total_steps:
                    evaluate(done, state)
                if checkpoint_every and done % checkpoint_every == 0:
                    checkpoints.save(done, state)
                if stop["stop"]:
                    checkpoints.save(done, state)
                    raise Interrupted(
                        f"interrupted at step {done}; "
                        + (f"saved, rerun to resume from {checkpoints.directory}" if checkpoints.directory
                           else "no checkpoint directory, nothing saved")
                    )  # fmt: skip
        checkpoints.save(done, state)
        if evaluate is not None:
            evaluate(done, state)
    finally:
        bar.close()
        checkpoints.close()
    return state
