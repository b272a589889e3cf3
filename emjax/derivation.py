"""Gradient spillover, measured and predicted: does fine-tuning move every SAE feature as the
first-order account says?

For a base model, its LoRA adapters, SAEs at some layers and prompts:
  measured   delta z_j = mean z_j(fine-tuned) - mean z_j(base), SAE pre-activations of every feature,
             mean over the counted (mask = 1) tokens;
  predicted  the first-order change of the same means: ONE jax.jvp at the base weights along the
             merged update, the tangent of each adapted weight W being LoRA.delta() = scale A @ B
             (a jvp over the factors at B = 0 would see only half of a product);
  geometric  alpha (w_j . d_t): d_t the unit mean of the target set's unit decoder rows, w_j the
             encoder column, alpha fitted on the target features alone and applied to all others.
Correlations (Pearson, Spearman, bootstrap CIs over features) of predicted against measured and of
the measured shift against the decoder cosine to d_t, with the toxic features singled out, per layer.

The dynamics monitor watches the same quantities during training: `DynamicsMonitor` is a training
loop callback `monitor(step, metrics, model)`; `measure_dynamics` is its pure measurement.
"""

from __future__ import annotations

import json
import logging
import math
import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from scipy import stats

from emjax import artifacts, distributed, lora
from emjax.loop import MetricsLog, StopTraining

_log = logging.getLogger(__name__)
F32 = jnp.float32


def first_order_shift(fn: Callable, params, tangent):
    """J fn(params) . tangent: the first-order change of fn along `tangent`, one forward-mode pass."""
    return jax.jvp(fn, (params,), (tangent,))[1]


# ---------------------------------------------------------------------------- measured and predicted shifts


def adapted_weights(model) -> dict[tuple, lora.LoRA]:
    """nnx state path of every adapted (stacked) base weight -> its (stacked) adapter."""
    found = {
        ("blocks", "layers", position, parent_name, weight_name): adapter
        for position, parent_name, weight_name, adapter in lora.stacked_adapters(model)
    }
    if not found:
        raise ValueError("the model has no LoRA adapters: nothing to derive (emjax.lora.attach or load_peft first)")
    return found


def lora_tangents(model) -> dict[tuple, jax.Array]:
    """The merged update of each adapted weight, LoRA.delta(), in the weight's dtype: the jvp tangent
    (stacked over layers like the weight; zero on layers without the adapter)."""
    out = {}
    for path, adapter in adapted_weights(model).items():
        weight = model
        for name in path:
            weight = weight[name] if isinstance(name, int) else getattr(weight, name)
        out[path] = adapter.delta().astype(weight.dtype)
    return out


def _split_for_jvp(model):
    """(graphdef, LoRA state, {path: adapted weight}, the rest of the state)."""
    paths = set(adapted_weights(model))
    graphdef, lora_state, weights, rest = nnx.split(model, lora.LoRAParam, lambda path, _: tuple(path) in paths, ...)
    flat = {tuple(p): v.get_value() for p, v in nnx.to_flat_state(weights)}
    return graphdef, lora_state, flat, rest


def _sae_split(saes: Mapping[int, nnx.Module], mesh=None):
    """(layers, graphdefs, states); with a mesh, SAE weights not yet on it are replicated over it."""
    layers = tuple(sorted(saes))
    if not layers:
        raise ValueError("no SAEs given: derivation needs {layer: SAE}")
    parts = {layer: nnx.split(saes[layer]) for layer in layers}
    states = {layer: state for layer, (_, state) in parts.items()}
    if mesh is not None:
        states = distributed.onto_mesh(states, mesh)
    return layers, {layer: graphdef for layer, (graphdef, _) in parts.items()}, states


def _padded_batches(tokens: np.ndarray, mask: np.ndarray, batch_size: int, mesh, rules):
    """Host batches of a multiple of the data shards, padding rows masked out, placed on the mesh."""
    if tokens.shape != mask.shape or tokens.ndim != 2:
        raise ValueError(f"tokens {tokens.shape} and mask {mask.shape} must both be [rows, length]")
    parts = 1 if mesh is None else math.prod(mesh.shape[a] for a in distributed.batch_axes(mesh, rules))
    batch = -(-batch_size // parts) * parts
    for lo in range(0, len(tokens), batch):
        ids, valid = tokens[lo : lo + batch], mask[lo : lo + batch]
        pad = batch - len(ids)
        if pad:
            ids = np.concatenate([ids, np.zeros((pad, ids.shape[1]), ids.dtype)])
            valid = np.concatenate([valid, np.zeros((pad, valid.shape[1]), valid.dtype)])
        host = {"ids": ids.astype(np.int32), "mask": valid.astype(np.int32)}
        if mesh is None:
            yield host["ids"], host["mask"]
        else:
            placed = distributed.shard_batch({k: v[distributed.process_slice(batch)] for k, v in host.items()},
                                             mesh, rules)  # fmt: skip
            yield placed["ids"], placed["mask"]


def feature_shifts(
    model, saes: Mapping[int, nnx.Module], tokens: np.ndarray, mask: np.ndarray, *,
    batch_size: int = 8, mesh=None, rules=None,
) -> dict[int, dict[str, np.ndarray]]:  # fmt: skip
    """Per SAE layer: base and fine-tuned mean pre-activations [d_sae], measured = tuned - base, and
    predicted (first-order, one jvp along the merged LoRA update), over the tokens with mask = 1.

    `model` carries its (trained) adapters; the base is the same model with the adapters zeroed.
    """
    graphdef, lora_state, weights, rest = _split_for_jvp(model)
    tangent = lora_tangents(model)
    layers, sae_defs, sae_states = _sae_split(saes, mesh)
    stop = max(layers) + 1

    def sums(lora_state, weights, sae_states, ids, valid):
        state = nnx.from_flat_state(list(weights.items()))
        net = nnx.merge(graphdef, lora_state, state, rest)
        captured = net(ids, attention_mask=valid, capture=layers, stop_at_layer=stop).captured
        w = valid.astype(F32)
        out = {}
        for layer in layers:
            pre = nnx.merge(sae_defs[layer], sae_states[layer]).pre_activations(captured[layer])
            out[layer] = jnp.einsum("bt,btf->f", w, pre)
        return out

    @jax.jit
    def step(lora_state, weights, tangent, sae_states, ids, valid):
        zero = jax.tree.map(jnp.zeros_like, lora_state)
        base, predicted = jax.jvp(lambda w: sums(zero, w, sae_states, ids, valid), (weights,), (tangent,))
        tuned = sums(lora_state, weights, sae_states, ids, valid)
        return base, tuned, predicted, jnp.sum(valid)

    totals = {layer: {k: 0.0 for k in ("base", "tuned", "predicted")} for layer in layers}
    count = 0.0
    for ids, valid in _padded_batches(np.asarray(tokens), np.asarray(mask), batch_size, mesh, rules):
        base, tuned, predicted, n = step(lora_state, weights, tangent, sae_states, ids, valid)
        count += float(n)
        for layer in layers:
            for name, value in (("base", base), ("tuned", tuned), ("predicted", predicted)):
                totals[layer][name] = totals[layer][name] + distributed.gather_to_host(value[layer]).astype(np.float64)
    if not count:
        raise ValueError("the mask counts no token: nothing to average")
    out = {}
    for layer in layers:
        means = {k: v / count for k, v in totals[layer].items()}
        out[layer] = {**means, "measured": means["tuned"] - means["base"]}
    return out


# ---------------------------------------------------------------------------- geometry and statistics


def _unit_rows(w: np.ndarray) -> np.ndarray:
    w = np.asarray(w, np.float64)
    return w / np.maximum(np.linalg.norm(w, axis=-1, keepdims=True), 1e-30)


def set_direction(rows: np.ndarray, ids: Sequence[int]) -> np.ndarray:
    """The unit mean of the unit rows `ids` of `rows` [n, d]: a feature set's direction."""
    ids = np.asarray(ids, np.int64)
    if not len(ids):
        raise ValueError("an empty feature set has no direction")
    return _unit_rows(_unit_rows(rows[ids]).mean(0))


def geometric_prediction(w_enc: np.ndarray, w_dec: np.ndarray, target: Sequence[int], measured: np.ndarray):
    """(alpha, alpha * (w_j . d_t) for every j): alpha is the least-squares fit on the target features only."""
    d_t = set_direction(w_dec, target)
    reading = np.asarray(w_enc, np.float64).T @ d_t  # [d_sae]: w_j . d_t
    t = np.asarray(target, np.int64)
    denominator = float(reading[t] @ reading[t])
    if denominator == 0:
        raise ValueError("the target features' encoders are orthogonal to their own direction: alpha is undefined")
    alpha = float(reading[t] @ np.asarray(measured, np.float64)[t]) / denominator
    return alpha, alpha * reading


def correlations(x, y, *, bootstrap: int = 1000, seed: int = 0, level: float = 0.95) -> dict:
    """Pearson and Spearman of x and y with percentile bootstrap CIs (resampling pairs)."""
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    if x.shape != y.shape or x.ndim != 1:
        raise ValueError(f"correlations need two equal-length vectors, got {x.shape} and {y.shape}")
    if len(x) < 3:
        raise ValueError(f"correlations need at least 3 pairs, got {len(x)}")
    out = {"n": len(x)}
    tails = [(1 - level) / 2 * 100, (1 + level) / 2 * 100]
    index = np.random.default_rng(seed).integers(0, len(x), (bootstrap, len(x)))
    for name, transform in (("pearson", lambda a: a), ("spearman", lambda a: stats.rankdata(a, axis=-1))):
        a, b = transform(x), transform(y)
        out[name] = _pearson(a, b)
        if bootstrap:
            samples = _pearson(transform(x[index]), transform(y[index]))
            out[f"{name}_ci"] = [float(v) for v in np.nanpercentile(samples, tails)]
    return out


def _pearson(a: np.ndarray, b: np.ndarray):
    """Row-wise Pearson correlation (nan where a row is constant)."""
    a = a - a.mean(-1, keepdims=True)
    b = b - b.mean(-1, keepdims=True)
    denominator = np.sqrt((a * a).sum(-1) * (b * b).sum(-1))
    with np.errstate(invalid="ignore", divide="ignore"):
        r = (a * b).sum(-1) / denominator
    return float(r) if np.ndim(r) == 0 else r


def layer_report(shifts: Mapping[str, np.ndarray], w_enc, w_dec, target, toxic=(), *, bootstrap=1000, seed=0) -> dict:
    """One layer's comparison: jvp and geometric predictions against the measured shifts."""
    measured, predicted = shifts["measured"], shifts["predicted"]
    alpha, geometric = geometric_prediction(w_enc, w_dec, target, measured)
    cosine = _unit_rows(w_dec) @ set_direction(w_dec, target)
    others = np.setdiff1d(np.arange(len(measured)), np.asarray(target, np.int64))
    toxic = np.asarray(toxic, np.int64)

    def corr(a, b, ids):
        return correlations(a[ids], b[ids], bootstrap=bootstrap, seed=seed) if len(ids) >= 3 else None

    everyone = np.arange(len(measured))
    return {
        "alpha": alpha,
        "jvp_vs_measured": corr(predicted, measured, everyone),
        "geometric_vs_measured_out_of_sample": corr(geometric, measured, others),
        "shift_vs_cosine": corr(cosine, measured, others),
        "measured_mean": {
            "target": float(measured[np.asarray(target)].mean()),
            "others": float(measured[others].mean()),
            "toxic": float(measured[toxic].mean()) if len(toxic) else None,
        },
        "toxic": [
            {
                "id": int(j),
                "cosine": float(cosine[j]),
                "measured": float(measured[j]),
                "predicted": float(predicted[j]),
                "geometric": float(geometric[j]),
            }
            for j in toxic
        ],
        "toxic_jvp_vs_measured": corr(predicted, measured, toxic),
    }


def derive(
    model, saes: Mapping[int, nnx.Module], tokens, mask, *, target: Mapping[int, Sequence[int]],
    toxic: Mapping[int, Sequence[int]] | None = None, batch_size: int = 8, mesh=None, rules=None,
    bootstrap: int = 1000, seed: int = 0,
) -> tuple[dict, dict[int, dict[str, np.ndarray]]]:  # fmt: skip
    """(report {layer: layer_report}, the per-feature arrays of feature_shifts) for every SAE layer."""
    missing = sorted(set(saes) - set(target))
    if missing:
        raise ValueError(f"derivation: no target feature set for SAE layers {missing}")
    shifts = feature_shifts(model, saes, tokens, mask, batch_size=batch_size, mesh=mesh, rules=rules)
    report = {}
    for layer, arrays in shifts.items():
        sae = saes[layer]
        w_enc, w_dec = distributed.gather_to_host(sae.W_enc[...]), distributed.gather_to_host(sae.W_dec[...])
        report[layer] = layer_report(arrays, w_enc, w_dec, target[layer], (toxic or {}).get(layer, ()),
                                     bootstrap=bootstrap, seed=seed)  # fmt: skip
    return report, shifts


# ---------------------------------------------------------------------------- plots


def save_figure(fig, path) -> None:
    """A matplotlib figure written atomically as PNG."""
    import io

    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=120)
    artifacts.write_bytes(path, buffer.getvalue())


def plot_scatter(x, y, path, *, xlabel: str, ylabel: str, highlight=None) -> None:
    """A scatter of y against x with the identity line (and `highlight` indices marked)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    x, y = np.asarray(x), np.asarray(y)
    fig, ax = plt.subplots(figsize=(4.5, 4))
    ax.scatter(x, y, s=6, alpha=0.6)
    if highlight is not None and len(highlight):
        ax.scatter(x[highlight], y[highlight], s=14, color="red", label="toxic")
        ax.legend()
    lo, hi = float(min(x.min(), y.min())), float(max(x.max(), y.max()))
    ax.plot([lo, hi], [lo, hi], color="gray", lw=0.8)
    ax.set(xlabel=xlabel, ylabel=ylabel)
    fig.tight_layout()
    save_figure(fig, path)
    plt.close(fig)


def plot_report(shifts, saes, target, toxic, out_dir) -> list[Path]:
    """Per layer: predicted_vs_measured_L{layer}.png and shift_vs_cosine_L{layer}.png (toxic in red)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for layer, arrays in shifts.items():
        w_dec = distributed.gather_to_host(saes[layer].W_dec[...])
        cosine = _unit_rows(w_dec) @ set_direction(w_dec, target[layer])
        marked = np.asarray((toxic or {}).get(layer, ()), np.int64)
        for name, x, label in (
            ("predicted_vs_measured", arrays["predicted"], "predicted shift (jvp)"),
            ("shift_vs_cosine", cosine, "decoder cosine to the target direction"),
        ):
            path = out_dir / f"{name}_L{layer}.png"
            plot_scatter(x, arrays["measured"], path, xlabel=label, ylabel="measured shift", highlight=marked)
            written.append(path)
    return written


# ---------------------------------------------------------------------------- training dynamics


def probe_means(model, saes: Mapping[int, nnx.Module], tokens, mask, *, mesh=None, rules=None, batch_size=None):
    """{layer: (mean hidden state [D], mean SAE activation per feature [d_sae])} over the counted tokens."""
    layers, sae_defs, sae_states = _sae_split(saes, mesh)
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
            out[layer] = (jnp.einsum("bt,btd->d", w, h), jnp.einsum("bt,btf->f", w, acts))
        return out, jnp.sum(valid)

    tokens, mask = np.asarray(tokens), np.asarray(mask)
    totals, count = {}, 0.0
    for ids, valid in _padded_batches(tokens, mask, batch_size or len(tokens), mesh, rules):
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
            dec, enc = set_direction(w_dec, ids), set_direction(w_enc, ids)
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


def plot_dynamics(jsonl: str | os.PathLike, path: str | os.PathLike) -> None:
    """Mean activation and encoder cosine of each feature set over steps, one line per layer and set."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = [json.loads(line) for line in Path(jsonl).read_text().splitlines() if line.strip()]
    if not records:
        raise ValueError(f"{jsonl}: no dynamics records to plot")
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.5))
    steps = [r["step"] for r in records]
    for layer, sets in records[0]["layers"].items():
        for name in sets:
            for ax, key in zip(axes, ("activation", "encoder_cosine")):
                ax.plot(steps, [r["layers"][layer][name][key] for r in records], label=f"L{layer} {name}")
    axes[0].set(xlabel="step", ylabel="mean activation")
    axes[1].set(xlabel="step", ylabel="cos(mean hidden, encoder direction)")
    axes[1].legend(fontsize=7)
    fig.tight_layout()
    save_figure(fig, path)
    plt.close(fig)
