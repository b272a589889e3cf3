"""Gradient spillover, measured and predicted: does fine-tuning move every SAE feature as the
first-order account says?

For a base model, its LoRA adapters, SAEs at some layers and prompts:
  measured   delta z_j = mean z_j(fine-tuned) - mean z_j(base), SAE pre-activations of every feature,
             mean over the counted (mask = 1) tokens;
  predicted  the first-order change of the same means: ONE jax.jvp at the base weights along the
             merged update, the tangent of each adapted weight W being LoRA.delta() = scale A @ B
             (a jvp over the factors at B = 0 would see only half of a product);
  geometric  alpha (w_j . d_t): d_t the unit mean of the target set's unit decoder rows, w_j the
             encoder column, alpha fitted on the target features alone and applied to all others;
             the account's premise is alpha > 0 (features near the fine-tuned ones rise);
  null       the first-order shift along a random update of the same norm, weight by weight: how well
             an update unrelated to the fine-tune "predicts" the measured shifts (its r is the null).
Correlations (Pearson, Spearman) of predicted against measured and of the measured shift against
the decoder cosine to d_t, the relative prediction error, alpha, and the toxic features' shifts and
firing (after the SAE's activation: TopK / JumpReLU threshold) before and after, each with a
bootstrap interval over the probe samples (the unit that was sampled), per layer.

The dynamics monitor (emjax.dynamics) watches the same quantities during training; emjax.plots draws
the figures.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from scipy import stats

from emjax import artifacts, distributed, feature_stats, geometry, lora, plots
from emjax.precision import matmul_precision

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


@jax.jit
def _squared_norms(tree):
    return jax.tree.map(lambda t: jnp.sum(jnp.square(t.astype(F32))), tree)


def update_norm(tangents: Mapping[tuple, jax.Array]) -> dict:
    """Frobenius norm of the merged update: in all and per transformer block."""
    per_block: dict[int, float] = {}
    for path, squared in _squared_norms(dict(tangents)).items():
        per_block[path[1]] = per_block.get(path[1], 0.0) + float(squared)
    return {"total": math.sqrt(sum(per_block.values())), "per_block": {b: math.sqrt(v) for b, v in per_block.items()}}


@jax.jit
def _random_like(key, tangents):
    paths = sorted(tangents)
    out = {}
    for i, path in enumerate(paths):
        t = tangents[path]
        direction = jax.random.normal(jax.random.fold_in(key, i), t.shape, F32)
        scale = jnp.linalg.norm(t.astype(F32)) / jnp.maximum(jnp.linalg.norm(direction), 1e-30)
        out[path] = (direction * scale).astype(t.dtype)
    return out


def random_tangents(tangents: Mapping[tuple, jax.Array], *, seed: int = 0) -> dict[tuple, jax.Array]:
    """A random update of the same size: for each adapted weight, a Gaussian direction with the Frobenius
    norm of that weight's real update (so every layer moves as far as the fine-tune moved it)."""
    out = _random_like(jax.random.key(seed), dict(tangents))
    return {path: jax.device_put(t, tangents[path].sharding) for path, t in out.items()}


ROW_FIELDS = ("base", "tuned", "predicted", "predicted_null", "fire_base", "fire_tuned")


def _sums(graphdef, rest, sae_defs, layers, lora_state, weights, sae_states, ids, valid):
    """Per row: the SAE pre-activation sums over the counted tokens (differentiated) and, as aux, the firing
    counts after the activation."""
    state = nnx.from_flat_state(list(weights.items()))
    net = nnx.merge(graphdef, lora_state, state, rest)
    captured = net(ids, attention_mask=valid, capture=layers, stop_at_layer=max(layers) + 1).captured
    w = valid.astype(F32)
    out, fired = {}, {}
    for layer, sae_def in zip(layers, sae_defs):
        sae = nnx.merge(sae_def, sae_states[layer])
        pre = sae.pre_activations(captured[layer])
        out[layer] = jnp.einsum("bt,btf->bf", w, pre, precision=matmul_precision(F32))
        fired[layer] = jnp.einsum("bt,btf->bf", w, (sae.activate(pre) > 0).astype(F32), precision=matmul_precision(F32))
    return out, fired


@functools.partial(jax.jit, static_argnames=("graphdef", "sae_defs", "layers"))
def _shift_step(
    lora_state, weights, rest, tangent, null_tangent, sae_states, ids, valid, *, graphdef, sae_defs, layers
):
    """One batch: base, tuned and first-order (along the update and along the random one) row sums; compiled
    once per model and SAE structure, so the doses of one fine-tune share it."""
    sums = functools.partial(_sums, graphdef, rest, sae_defs, layers)
    zero = jax.tree.map(jnp.zeros_like, lora_state)
    base, linear, fire_base = jax.linearize(lambda w: sums(zero, w, sae_states, ids, valid), weights, has_aux=True)
    tuned, fire_tuned = sums(lora_state, weights, sae_states, ids, valid)
    rows = {"base": base, "tuned": tuned, "predicted": linear(tangent), "predicted_null": linear(null_tangent),
            "fire_base": fire_base, "fire_tuned": fire_tuned}  # fmt: skip
    return rows, jnp.sum(valid, axis=1)


def feature_shifts(
    model, saes: Mapping[int, nnx.Module], tokens: np.ndarray, mask: np.ndarray, *,
    batch_size: int = 8, mesh=None, rules=None, null_seed: int = 0,
) -> dict[int, dict[str, np.ndarray]]:  # fmt: skip
    """Per SAE layer: base and fine-tuned mean pre-activations [d_sae], measured = tuned - base, predicted
    (first-order, one jvp along the merged LoRA update) and predicted_null (the same along
    random_tangents(seed=null_seed)), over the tokens with mask = 1; and `rows`: the per-row sums of
    each of ROW_FIELDS [n, d_sae] (fire_*: tokens where the feature fires after the activation), with
    `tokens` [n] counted per row, for a bootstrap over rows.

    `model` carries its (trained) adapters; the base is the same model with the adapters zeroed.
    """
    graphdef, lora_state, weights, rest = _split_for_jvp(model)
    tangent = lora_tangents(model)
    null_tangent = random_tangents(tangent, seed=null_seed)
    layers, sae_defs, sae_states = feature_stats.sae_states(saes, mesh)
    static = {"graphdef": graphdef, "sae_defs": tuple(sae_defs[layer] for layer in layers), "layers": layers}
    parts = {layer: {name: [] for name in ROW_FIELDS} for layer in layers}
    counts = []
    n = len(tokens)
    for ids, valid in feature_stats.padded_batches(np.asarray(tokens), np.asarray(mask), batch_size, mesh, rules):
        rows, per_row = _shift_step(lora_state, weights, rest, tangent, null_tangent, sae_states, ids, valid, **static)
        counts.append(distributed.gather_to_host(per_row).astype(np.float64))
        for layer in layers:
            for name in ROW_FIELDS:
                parts[layer][name].append(distributed.gather_to_host(rows[name][layer]).astype(np.float64))
    counted = np.concatenate(counts)[:n]
    if not counted.sum():
        raise ValueError("the mask counts no token: nothing to average")
    out = {}
    for layer in layers:
        per_row = {name: np.concatenate(v)[:n] for name, v in parts[layer].items()}
        means = {k: v.sum(0) / counted.sum() for k, v in per_row.items() if not k.startswith("fire")}
        out[layer] = {**means, "measured": means["tuned"] - means["base"], "rows": per_row, "tokens": counted}
    return out


# ---------------------------------------------------------------------------- geometry and statistics


def geometric_prediction(w_enc: np.ndarray, w_dec: np.ndarray, target: Sequence[int], measured: np.ndarray):
    """(alpha, alpha * (w_j . d_t) for every j): alpha is the least-squares fit on the target features only."""
    d_t = geometry.set_direction(w_dec, target)
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


def _spearman(a: np.ndarray, b: np.ndarray):
    return _pearson(stats.rankdata(a, axis=-1), stats.rankdata(b, axis=-1))


def _estimates(rows: Mapping[str, np.ndarray], tokens: np.ndarray, weights: np.ndarray, sets: dict) -> dict:
    """Every statistic of layer_report for each row of sample weights [r, n] (a bootstrap resample's counts)."""
    counted = weights @ tokens
    mean = {name: (weights @ rows[name]) / counted[:, None] for name in ROW_FIELDS}
    measured, predicted, null = mean["tuned"] - mean["base"], mean["predicted"], mean["predicted_null"]
    target, others, toxic, reading, cosine = (sets[k] for k in ("target", "others", "toxic", "reading", "cosine"))
    alpha = (measured[:, target] @ reading[target]) / (reading[target] @ reading[target])
    size = np.linalg.norm(measured, axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        out = {
            "jvp_pearson": _pearson(predicted, measured),
            "jvp_spearman": _spearman(predicted, measured),
            "null_pearson": _pearson(null, measured),
            "prediction_error": np.linalg.norm(measured - predicted, axis=1) / size,
            "null_prediction_error": np.linalg.norm(measured - null, axis=1) / size,
            "alpha": alpha,
            "geometric_pearson": _pearson(alpha[:, None] * reading[others], measured[:, others]),
            "cosine_spearman": _spearman(np.broadcast_to(cosine[others], (len(alpha), len(others))),
                                         measured[:, others]),
            "target_shift": measured[:, target].mean(1),
            "others_shift": measured[:, others].mean(1),
        }
    out["jvp_minus_null"] = out["jvp_pearson"] - out["null_pearson"]
    if len(toxic):
        out["toxic_shift"] = measured[:, toxic].mean(1)
        out["toxic_firing_base"] = mean["fire_base"][:, toxic].mean(1)
        out["toxic_firing_tuned"] = mean["fire_tuned"][:, toxic].mean(1)
        out["toxic_firing_change"] = out["toxic_firing_tuned"] - out["toxic_firing_base"]
    if len(toxic) >= 3:
        out["toxic_jvp_pearson"] = _pearson(predicted[:, toxic], measured[:, toxic])
    return out


def _number(x) -> float | None:
    x = float(x)
    return x if np.isfinite(x) else None


def layer_report(shifts: Mapping, w_enc, w_dec, target, toxic=(), *, bootstrap=1000, seed=0, level=0.95) -> dict:
    """One layer's comparison (shifts: one layer of feature_shifts): jvp, random-update and geometric
    predictions against the measured shifts, alpha (with `premise_met`: alpha > 0 with its interval above
    0), the toxic features' shifts and firing before and after; each statistic's percentile interval from
    `bootstrap` resamples of the probe samples (rows), which is what was sampled, not the features."""
    rows, tokens = shifts["rows"], np.asarray(shifts["tokens"], np.float64)
    n, d = rows["base"].shape
    target, toxic = np.asarray(target, np.int64), np.asarray(toxic, np.int64)
    d_t = geometry.set_direction(w_dec, target)
    reading = np.asarray(w_enc, np.float64).T @ d_t  # w_j . d_t
    if not reading[target] @ reading[target]:
        raise ValueError("the target features' encoders are orthogonal to their own direction: alpha is undefined")
    sets = {"target": target, "toxic": toxic, "reading": reading, "cosine": geometry.cosines_to(w_dec, d_t),
            "others": np.setdiff1d(np.arange(d), target)}  # fmt: skip
    point = {k: v[0] for k, v in _estimates(rows, tokens, np.ones((1, n)), sets).items()}
    draws: dict[str, list] = {k: [] for k in point}
    rng = np.random.default_rng(seed)
    for lo in range(0, bootstrap, 100):
        weights = rng.multinomial(n, np.full(n, 1 / n), size=min(100, bootstrap - lo)).astype(np.float64)
        for k, v in _estimates(rows, tokens, weights, sets).items():
            draws[k].append(v)
    tails = [(1 - level) / 2 * 100, (1 + level) / 2 * 100]

    def ci(key):
        v = np.concatenate(draws[key]) if draws[key] else np.empty(0)
        v = v[np.isfinite(v)]
        return [float(x) for x in np.percentile(v, tails)] if len(v) > 1 else None

    def entry(key, name="value"):
        return {name: _number(point[key]), f"{name}_ci" if name != "value" else "ci": ci(key)}

    def p_two_sided(key):
        """Bootstrap p of the statistic being 0: twice the share of resamples on the far side of 0."""
        v = np.concatenate(draws[key])
        v = v[np.isfinite(v)]
        if len(v) < 2:
            return None
        return float(min(1.0, 2 * (1 + min((v <= 0).sum(), (v >= 0).sum())) / (1 + len(v))))

    alpha_ci = ci("alpha")
    report = {
        "samples": int(n),
        "bootstrap": int(bootstrap),
        "alpha": _number(point["alpha"]),
        "alpha_ci": alpha_ci,
        "alpha_p_two_sided": p_two_sided("alpha"),
        "premise_met": bool(point["alpha"] > 0 and alpha_ci is not None and alpha_ci[0] > 0),
        "jvp_vs_measured": {"n": int(d)} | entry("jvp_pearson", "pearson") | entry("jvp_spearman", "spearman"),
        "null_vs_measured": entry("null_pearson", "pearson"),
        "jvp_minus_null": entry("jvp_minus_null") | {"p_two_sided": p_two_sided("jvp_minus_null")},
        "prediction_error": entry("prediction_error"),
        "null_prediction_error": entry("null_prediction_error"),
        "geometric_vs_measured_out_of_sample": entry("geometric_pearson", "pearson"),
        "shift_vs_cosine": entry("cosine_spearman", "spearman"),
        "measured_mean": {
            "target": _number(point["target_shift"]),
            "others": _number(point["others_shift"]),
            "toxic": _number(point["toxic_shift"]) if len(toxic) else None,
            "toxic_ci": ci("toxic_shift") if len(toxic) else None,
        },
        "toxic_firing": (
            {"base": _number(point["toxic_firing_base"]), "tuned": _number(point["toxic_firing_tuned"])}
            | entry("toxic_firing_change", "change")
            if len(toxic) else None
        ),
        "toxic_jvp_vs_measured": entry("toxic_jvp_pearson", "pearson") if len(toxic) >= 3 else None,
    }
    mean = {name: rows[name].sum(0) / tokens.sum() for name in ROW_FIELDS}
    measured = mean["tuned"] - mean["base"]
    report["toxic"] = [
        {"id": int(j), "cosine": float(sets["cosine"][j]), "measured": float(measured[j]),
         "predicted": float(mean["predicted"][j]), "geometric": _number(point["alpha"] * reading[j]),
         "firing_base": float(mean["fire_base"][j]), "firing_tuned": float(mean["fire_tuned"][j])}
        for j in toxic
    ]  # fmt: skip
    return report


def derive(
    model, saes: Mapping[int, nnx.Module], tokens, mask, *, target: Mapping[int, Sequence[int]],
    toxic: Mapping[int, Sequence[int]] | None = None, batch_size: int = 8, mesh=None, rules=None,
    bootstrap: int = 1000, seed: int = 0,
) -> tuple[dict, dict[int, dict[str, np.ndarray]]]:  # fmt: skip
    """(report {layer: layer_report}, the per-feature arrays of feature_shifts) for every SAE layer;
    the random update of the null drawn with `seed`."""
    missing = sorted(set(saes) - set(target))
    if missing:
        raise ValueError(f"derivation: no target feature set for SAE layers {missing}")
    shifts = feature_shifts(model, saes, tokens, mask, batch_size=batch_size, mesh=mesh, rules=rules, null_seed=seed)
    report = {}
    for layer, arrays in shifts.items():
        sae = saes[layer]
        w_enc, w_dec = distributed.gather_to_host(sae.W_enc[...]), distributed.gather_to_host(sae.W_dec[...])
        report[layer] = layer_report(arrays, w_enc, w_dec, target[layer], (toxic or {}).get(layer, ()),
                                     bootstrap=bootstrap, seed=seed)  # fmt: skip
    return report, shifts


def dose_sweep(load: Callable, adapters: Sequence[tuple], saes: Mapping[int, nnx.Module], tokens, mask, *,
               target: Mapping[int, Sequence[int]], toxic: Mapping[int, Sequence[int]], bootstrap: int, seed: int,
               mesh=None, rules=None) -> tuple[dict, dict, list[dict]]:  # fmt: skip
    """`derive` at each (fraction of training, step, adapter) of `adapters`, the last the fine-tune's end
    (`load(adapter)`: the base model with that adapter): (the last one's report and shifts, the dose sweep: per
    adapter its fraction, step, update norm and each layer's dose_point)."""
    sweep = []
    for fraction, step, adapter in adapters:
        model = load(adapter)
        report, shifts = derive(model, saes, tokens, mask, target=target, toxic=toxic, mesh=mesh, rules=rules,
                                bootstrap=bootstrap, seed=seed)  # fmt: skip
        norm = update_norm(lora_tangents(model))["total"]
        sweep.append({"fraction": fraction, "step": step, "update_norm": norm,
                      "layers": {str(layer): dose_point(r) for layer, r in report.items()}})  # fmt: skip
    return report, shifts, sweep


def write(out: Path, report: dict, shifts: dict, sweep: list[dict], saes, target, toxic) -> None:
    """report.json ({"layers": the final adapter's layer reports, "doses": the sweep}), plot_report's figures and
    dose_error.png (with more than one dose)."""
    artifacts.write_json(out / "report.json", {"layers": {str(k): v for k, v in report.items()}, "doses": sweep})
    plot_report(shifts, saes, target, toxic, out)
    if len(sweep) > 1:
        plots.plot_dose([{"layer": int(layer), "update_norm": d["update_norm"], "error": p["prediction_error"],
                          "null_error": p["null_prediction_error"]} for d in sweep for layer, p in d["layers"].items()],
                        out / "dose_error.png")  # fmt: skip


def layer_summary(r: dict) -> dict:
    """The derivation stage's manifest summary of one layer's report (layer_report)."""
    return {
        "jvp_vs_measured": r["jvp_vs_measured"]["pearson"],
        "jvp_vs_measured_ci": r["jvp_vs_measured"]["pearson_ci"],
        "null_vs_measured": r["null_vs_measured"]["pearson"],
        "jvp_minus_null": r["jvp_minus_null"]["value"],
        "jvp_minus_null_ci": r["jvp_minus_null"]["ci"],
        "jvp_minus_null_p": r["jvp_minus_null"]["p_two_sided"],
        "prediction_error": r["prediction_error"]["value"],
        "geometric_vs_measured": r["geometric_vs_measured_out_of_sample"]["pearson"],
        "shift_vs_cosine": r["shift_vs_cosine"]["spearman"],
        "alpha": r["alpha"],
        "alpha_ci": r["alpha_ci"],
        "alpha_p": r["alpha_p_two_sided"],
        "premise_met": r["premise_met"],
        "toxic_shift": r["measured_mean"]["toxic"],
        "toxic_shift_ci": r["measured_mean"]["toxic_ci"],
        "toxic_firing": r["toxic_firing"],
    }


def dose_point(r: dict) -> dict:
    """What the dose sweep shows of one layer's report (layer_report)."""
    return {
        "prediction_error": r["prediction_error"]["value"],
        "prediction_error_ci": r["prediction_error"]["ci"],
        "null_prediction_error": r["null_prediction_error"]["value"],
        "jvp_vs_measured": r["jvp_vs_measured"]["pearson"],
        "null_vs_measured": r["null_vs_measured"]["pearson"],
        "alpha": r["alpha"],
        "alpha_ci": r["alpha_ci"],
    }


def plot_report(shifts, saes, target, toxic, out_dir) -> list[Path]:
    """Per layer: predicted_vs_measured_L{layer}.png and shift_vs_cosine_L{layer}.png (toxic in red)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for layer, arrays in shifts.items():
        w_dec = distributed.gather_to_host(saes[layer].W_dec[...])
        cosine = geometry.cosines_to(w_dec, geometry.set_direction(w_dec, target[layer]))
        marked = np.asarray((toxic or {}).get(layer, ()), np.int64)
        for name, x, label in (
            ("predicted_vs_measured", arrays["predicted"], "predicted shift (jvp)"),
            ("shift_vs_cosine", cosine, "decoder cosine to the target direction"),
        ):
            path = out_dir / f"{name}_L{layer}.png"
            plots.plot_scatter(x, arrays["measured"], path, xlabel=label, ylabel="measured shift", highlight=marked)
            written.append(path)
    return written
