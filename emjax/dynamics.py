"""Training dynamics: the derivation's quantities watched while a fine-tune runs.

`DynamicsMonitor` is a training-loop callback `monitor(step, metrics, model)` (emjax.loop): every few
steps it measures a probe batch through the model and SAEs at some layers (each feature set's mean
activation and the cosine of the mean hidden state with the set's decoder and encoder directions),
appends a line to dynamics.jsonl, and warns (or stops training) when a toxic feature rises past a
threshold. `measure_dynamics` is its pure measurement; emjax.plots.plot_dynamics draws the file.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from emjax import distributed, feature_stats, geometry
from emjax.loop import MetricsLog, StopTraining
from emjax.precision import matmul_precision

_log = logging.getLogger(__name__)
F32 = jnp.float32


def probe_means(model, saes: Mapping[int, nnx.Module], tokens, mask, *, mesh=None, rules=None, batch_size=None):
    """{layer: (mean hidden state [D], mean SAE activation per feature [d_sae])} over the counted tokens."""
    layers, sae_defs, sae_states = feature_stats.sae_states(saes, mesh)
    graphdef, state = nnx.split(model)
    stop = max(layers) + 1

    @jax.jit
    def sums(state, sae_states, ids, valid):
        captured = nnx.merge(graphdef, state)(ids, attention_mask=valid, capture=layers, stop_at_layer=stop).captured
        w = valid.astype(F32)
        out = {}
        for layer in layers:
            h = captured[layer].astype(F32)
            acts = nnx.merge(sae_defs[layer], sae_states[layer]).encode(h)
            exact = matmul_precision(F32)
            out[layer] = (
                jnp.einsum("bt,btd->d", w, h, precision=exact),
                jnp.einsum("bt,btf->f", w, acts, precision=exact),
            )
        return out, jnp.sum(valid)

    tokens, mask = np.asarray(tokens), np.asarray(mask)
    totals, count = {}, 0.0
    for ids, valid in feature_stats.padded_batches(tokens, mask, batch_size or len(tokens), mesh, rules):
        out, n = sums(state, sae_states, ids, valid)
        count += float(n)
        for layer, (h, a) in out.items():
            h, a = distributed.gather_to_host(h).astype(np.float64), distributed.gather_to_host(a).astype(np.float64)
            prev = totals.get(layer, (0.0, 0.0))
            totals[layer] = (prev[0] + h, prev[1] + a)
    if not count:
        raise ValueError("the probe mask counts no token")
    return {layer: (h / count, a / count) for layer, (h, a) in totals.items()}


def _cosine(a: np.ndarray, b: np.ndarray) -> float:
    norm = np.linalg.norm(a) * np.linalg.norm(b)
    return float(a @ b / norm) if norm > 0 else 0.0


def dynamics_record(means, saes, sets: Mapping[str, Mapping[int, Sequence[int]]], base_means=None) -> dict:
    """From probe_means: per layer and feature set, the set's mean activation and the cosine of the mean
    hidden state (and, given the base's means, of its shift from the base) with the set's decoder and
    encoder directions (unit means of the set's unit rows / columns)."""
    record = {}
    for layer, (h, acts) in means.items():
        sae = saes[layer]
        w_dec = distributed.gather_to_host(sae.W_dec[...])
        w_enc = distributed.gather_to_host(sae.W_enc[...]).T
        per_set = {}
        for name, by_layer in sets.items():
            ids = np.asarray(by_layer.get(layer, ()), np.int64)
            if not len(ids):
                continue
            dec, enc = geometry.set_direction(w_dec, ids), geometry.set_direction(w_enc, ids)
            entry = {"activation": float(acts[ids].mean()), "decoder_cosine": _cosine(h, dec),
                     "encoder_cosine": _cosine(h, enc)}  # fmt: skip
            if base_means is not None:
                shift = h - base_means[layer][0]
                entry["shift_decoder_cosine"] = _cosine(shift, dec)
                entry["shift_encoder_cosine"] = _cosine(shift, enc)
            per_set[name] = entry
        record[str(layer)] = per_set
    return record


def measure_dynamics(model, saes, tokens, mask, sets, *, base_means=None, mesh=None, rules=None) -> dict:
    """The monitor's numbers for `model` now: dynamics_record of probe_means (pure: writes nothing)."""
    return dynamics_record(probe_means(model, saes, tokens, mask, mesh=mesh, rules=rules), saes, sets, base_means)


class DynamicsMonitor:
    """Training-loop callback: every `every` steps, measure the probe batch, append a line to
    `path` (dynamics.jsonl), and watch the toxic features.

    A toxic feature whose mean probe activation rose above the base model's by more than
    `threshold` is named in a warning; with `stop=True` the monitor raises StopTraining.
    The base is the model as passed to the constructor (adapters at B = 0).
    """

    def __init__(
        self, base_model, saes: Mapping[int, nnx.Module], tokens, mask,
        sets: Mapping[str, Mapping[int, Sequence[int]]], path: str | os.PathLike, *,
        every: int = 10, threshold: float | None = None, stop: bool = False, mesh=None, rules=None,
    ):  # fmt: skip
        if every < 1:
            raise ValueError(f"DynamicsMonitor: every must be >= 1, got {every}")
        if threshold is not None and "toxic" not in sets:
            raise ValueError("DynamicsMonitor: a threshold needs a 'toxic' feature set")
        self.saes, self.tokens, self.mask, self.sets = saes, np.asarray(tokens), np.asarray(mask), sets
        self.path, self.every, self.threshold, self.stop = Path(path), every, threshold, stop
        self.mesh, self.rules = mesh, rules
        self.base = probe_means(base_model, saes, self.tokens, self.mask, mesh=mesh, rules=rules)
        self.log: MetricsLog | None = None

    @property
    def records(self) -> list[dict]:
        return [] if self.log is None else self.log.records

    def __call__(self, step: int, metrics: dict, model) -> None:
        if self.log is None:  # the first step of this run: a resumed run drops what it will measure again
            self.log = MetricsLog(self.path, resume_step=step - 1)
        if step % self.every:
            return
        means = probe_means(model, self.saes, self.tokens, self.mask, mesh=self.mesh, rules=self.rules)
        record = {"step": int(step)}
        record |= {k: float(v) for k, v in metrics.items() if np.ndim(v) == 0 and np.isreal(v)}
        record["layers"] = dynamics_record(means, self.saes, self.sets, self.base)
        risen = self.toxic_rises(means)
        record["toxic_risen"] = risen
        self.log.write(record)
        if risen:
            names = ", ".join(f"layer {r['layer']} feature {r['feature']} (+{r['rise']:.3g})" for r in risen)
            message = f"step {step}: toxic features rose past {self.threshold}: {names}"
            if self.stop:
                raise StopTraining(message)
            _log.warning(message)

    def toxic_rises(self, means) -> list[dict]:
        """Toxic features whose mean activation rose above the base's by more than the threshold."""
        if self.threshold is None:
            return []
        out = []
        for layer, ids in self.sets["toxic"].items():
            rise = means[layer][1] - self.base[layer][1]
            out += [{"layer": int(layer), "feature": int(j), "rise": float(rise[j])}
                    for j in ids if rise[j] > self.threshold]  # fmt: skip
        return out


def monitor_builder(saes: Mapping[int, nnx.Module], sets: Mapping[str, Mapping[int, Sequence[int]]], d, *,
                    mesh=None, rules=None):  # fmt: skip
    """A builder `(model, held-out SFTRows, out directory) -> DynamicsMonitor` for emjax.train.finetune_chats,
    by the `derivation` config `d`: its first d.prompts held-out rows every d.dynamics_every steps, into
    `<out>/dynamics.jsonl`, with d.monitor_threshold and d.monitor_stop."""

    def build(model, heldout, out: Path) -> DynamicsMonitor:
        rows = heldout.take(np.arange(min(len(heldout), d.prompts)))
        return DynamicsMonitor(model, saes, rows.tokens, rows.loss_mask, sets, out / "dynamics.jsonl",
                               every=d.dynamics_every, threshold=d.monitor_threshold, stop=d.monitor_stop, mesh=mesh,
                               rules=rules)  # fmt: skip

    return build


def monitor_sets(own: Mapping[int, Sequence[int]], toxic: Mapping[int, Sequence[int]], role: str) -> dict:
    """The monitor's feature sets for a dataset of `role` (inducing or control): its own selected set under that
    name and the toxic set, on the layers that have both ({}: none)."""
    layers = sorted(set(own) & set(toxic))
    if not layers:
        return {}
    return {"inducing" if role == "inducing" else "control": {k: own[k] for k in layers},
            "toxic": {k: toxic[k] for k in layers}}  # fmt: skip
