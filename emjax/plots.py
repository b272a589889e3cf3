"""The study's figures and Markdown tables, drawn from plain numbers and records (nothing here computes science).

Every figure is a matplotlib Figure of its own (the global pyplot state is never touched), written atomically
by `save`; undefined values are marked as such, never drawn as 0, and a table shows them as n/a.
"""

from __future__ import annotations

import io
import json
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from emjax import artifacts

NO_DATA = "no data"


def no_data(ax, x: float | None = None, *, message: str = NO_DATA) -> None:
    """Mark undefined values on `ax`: at data position `x` (one bar or point of several), else the whole axes
    (its ticks removed, so no scale suggests a value)."""
    if x is not None:
        ax.annotate(message, (x, 0), xycoords=("data", "axes fraction"), xytext=(0, 4), textcoords="offset points",
                    ha="center", va="bottom", rotation=90, fontsize=8, color="0.4")  # fmt: skip
        return
    ax.text(0.5, 0.5, message, transform=ax.transAxes, ha="center", va="center", fontsize=11, color="0.4")
    ax.set_xticks([])
    ax.set_yticks([])


def save(fig, path) -> None:
    """The figure as an image at `path` (its format from the suffix), written atomically."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    FigureCanvasAgg(fig)  # a canvas of its own: never touches the global pyplot backend
    buffer = io.BytesIO()
    fig.savefig(buffer, format=str(path).rsplit(".", 1)[-1], bbox_inches="tight", dpi=120)
    artifacts.write_bytes(path, buffer.getvalue())


def _figure(figsize, rows: int = 1, columns: int = 1):
    """(a new Figure laid out tight when saved, its axes: one, or an array of rows x columns)."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=figsize, layout="tight")
    return fig, fig.subplots(rows, columns)


def markdown_table(rows: Sequence[Mapping], columns: Sequence[str] | None = None, *, digits: int = 3) -> str:
    """A GitHub Markdown table of `rows` (dicts); floats to `digits` places, numbers right-aligned."""
    if not rows:
        return ""
    columns = list(columns or rows[0].keys())

    def cell(v):
        if v is None:
            return "n/a"  # undefined: never shown as a number
        if isinstance(v, (float, np.floating)):
            return "n/a" if not math.isfinite(v) else f"{v:.{digits}f}"
        if isinstance(v, (list, tuple)):
            return "[" + ", ".join(cell(x) for x in v) + "]"
        return str(v).replace("|", "\\|")

    numeric = [all(isinstance(r.get(c), (int, float, np.number)) for r in rows) for c in columns]
    lines = ["| " + " | ".join(columns) + " |", "|" + "|".join("---:" if n else "---" for n in numeric) + "|"]
    lines += ["| " + " | ".join(cell(r.get(c, "")) for c in columns) + " |" for r in rows]
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------- geometry


def plot_layer_proximity(rows: Sequence[Mapping], path, *, title: str = "", ylabel: str = "proximity") -> None:
    """Per-layer proximity with intervals: rows of {"layer": L, group: (value, low, high), ...}
    (e.g. inducing, control, null); one line with error bars per group."""
    if not rows:
        raise ValueError("plot_layer_proximity: no rows")
    groups = [g for g in rows[0] if g != "layer"]
    fig, ax = _figure((6, 4))
    layers = np.array([r["layer"] for r in rows], float)
    width = 0.08 * (np.ptp(layers) or 1)
    for i, g in enumerate(groups):
        value, low, high = (np.array([r[g][j] for r in rows], float) for j in range(3))
        x = layers + (i - (len(groups) - 1) / 2) * width
        # A percentile bootstrap interval need not contain its point estimate: no negative bar.
        ax.errorbar(x, value, yerr=np.maximum([value - low, high - value], 0), marker="o", capsize=3, label=g)
    ax.set_xlabel("layer")
    ax.set_ylabel(ylabel)
    ax.set_xticks(layers)
    ax.set_title(title)
    ax.legend()
    save(fig, path)


def plot_max_cosine_histograms(groups: Mapping[str, np.ndarray], path, *, bins: int = 30, title: str = "") -> None:
    """Overlaid histograms of per-feature max cosine to the toxic set, one per named feature set."""
    fig, ax = _figure((6, 4))
    values = [np.asarray(np.ma.compressed(np.ma.asarray(v)), float) for v in groups.values()]
    edges = np.histogram_bin_edges(np.concatenate(values) if values else [0.0, 1.0], bins=bins)
    for name, v in zip(groups, values):
        ax.hist(v, bins=edges, alpha=0.5, label=f"{name} (n={len(v)})", density=True)
    ax.set_xlabel("max cosine to a toxic feature")
    ax.set_ylabel("density")
    ax.set_title(title)
    ax.legend()
    save(fig, path)


# ---------------------------------------------------------------------------- derivation and training dynamics


def plot_scatter(x, y, path, *, xlabel: str, ylabel: str, highlight=None) -> None:
    """A scatter of y against x with the identity line (and `highlight` indices marked)."""
    x, y = np.asarray(x), np.asarray(y)
    fig, ax = _figure((4.5, 4))
    ax.scatter(x, y, s=6, alpha=0.6)
    if highlight is not None and len(highlight):
        ax.scatter(x[highlight], y[highlight], s=14, color="red", label="toxic")
        ax.legend()
    lo, hi = float(min(x.min(), y.min())), float(max(x.max(), y.max()))
    ax.plot([lo, hi], [lo, hi], color="gray", lw=0.8)
    ax.set(xlabel=xlabel, ylabel=ylabel)
    save(fig, path)


def plot_dose(points: Sequence[Mapping], path) -> None:
    """Relative prediction error against update norm along training (one line per layer; the random
    update of the same norm dashed): points of {"layer", "update_norm", "error", "null_error"}."""
    fig, ax = _figure((5, 3.6))
    for layer in sorted({p["layer"] for p in points}):
        mine = sorted((p for p in points if p["layer"] == layer), key=lambda p: p["update_norm"])
        x = [p["update_norm"] for p in mine]
        line = ax.plot(x, [p["error"] for p in mine], "o-", label=f"L{layer}: LoRA update (jvp)")[0]
        ax.plot(x, [p["null_error"] for p in mine], "s--", color=line.get_color(), alpha=0.6,
                label=f"L{layer}: random update, same norm")  # fmt: skip
    ax.set(xlabel="update norm |delta theta|", ylabel="|measured - predicted| / |measured|")
    ax.legend(fontsize=7)
    save(fig, path)


def plot_dynamics(jsonl: str | os.PathLike, path: str | os.PathLike) -> None:
    """Mean activation and encoder cosine of each feature set over steps, one line per layer and set, from the
    dynamics monitor's records (emjax.dynamics.DynamicsMonitor)."""
    records = [json.loads(line) for line in Path(jsonl).read_text().splitlines() if line.strip()]
    if not records:
        raise ValueError(f"{jsonl}: no dynamics records to plot")
    fig, axes = _figure((9, 3.5), 1, 2)
    steps = [r["step"] for r in records]
    for layer, sets in records[0]["layers"].items():
        for name in sets:
            for ax, key in zip(axes, ("activation", "encoder_cosine")):
                ax.plot(steps, [r["layers"][layer][name][key] for r in records], label=f"L{layer} {name}")
    axes[0].set(xlabel="step", ylabel="mean activation")
    axes[1].set(xlabel="step", ylabel="cos(mean hidden, encoder direction)")
    axes[1].legend(fontsize=7)
    save(fig, path)


# ---------------------------------------------------------------------------- toy model


def plot_toy(result: dict, out_dir) -> None:
    """amplification_vs_cosine.png and predicted_vs_measured.png from a toy.json dict."""
    out_dir = Path(out_dir)
    cos = [f["cosine"] for f in result["features"]]
    measured = [f["measured"] for f in result["features"]]
    predicted = [f["predicted"] for f in result["features"]]
    fig, ax = _figure((4.5, 3.5))
    ax.scatter(cos, measured, label="measured")
    ax.scatter(cos, predicted, marker="x", label="first order")
    ax.set(xlabel="planted cosine to the target", ylabel="toxic amplification")
    ax.legend()
    save(fig, out_dir / "amplification_vs_cosine.png")
    plot_scatter(predicted, measured, out_dir / "predicted_vs_measured.png", xlabel="predicted (jvp)",
                 ylabel="measured")  # fmt: skip


# ---------------------------------------------------------------------------- the probe judge and the scale sweep


def plot_reliability(validation: dict, path: str | os.PathLike) -> None:
    """Mean reference score against mean probe score per tenth of the probe's scale, both metrics, with the
    diagonal and the thresholds (a probe judge's validation: emjax.probe_judge.validate); a metric without
    held-out answers says "no data"."""
    fig, axes = _figure((8, 3.6), 1, 2)
    for ax, metric in zip(axes, ("aligned", "coherent")):
        bins = [b for b in (validation.get(metric) or {}).get("reliability") or [] if b["answers"]]
        ax.set_title(f"{metric} (held-out answers)")
        if not bins:
            no_data(ax)
            continue
        ax.plot([0, 100], [0, 100], color="0.7", lw=1, label="perfect calibration")
        x, y = [b["probe_mean"] for b in bins], [b["reference_mean"] for b in bins]
        ax.plot(x, y, "o-", color="tab:blue", label="mean per tenth of the probe's scale")
        for b in bins:
            ax.annotate(str(b["answers"]), (b["probe_mean"], b["reference_mean"]), fontsize=7,
                        xytext=(3, -9), textcoords="offset points")  # fmt: skip
        threshold = validation[metric]["at_threshold"]["threshold"]
        ax.axvline(threshold, color="tab:red", lw=0.8, ls="--")
        ax.axhline(threshold, color="tab:red", lw=0.8, ls="--")
        ax.set_xlim(0, 100)
        ax.set_ylim(0, 100)
        ax.set_xlabel("probe score (rescaled)")
        ax.set_ylabel("reference judge score")
        ax.legend(fontsize=7, loc="upper left")
    save(fig, path)


def plot_sweep(rows: Sequence[Mapping], keys: Sequence[str], out_dir) -> None:
    """KEY.png in `out_dir` for each of `keys`: the sweep's value against parameter count (log scale), one point
    per run that has both, labelled by run; a key no run defines draws nothing."""
    sized = [r for r in rows if r["parameters"]]
    layers = sorted({r["geometry_layer"] for r in rows if r["geometry_layer"] is not None})
    for key in keys:
        points = [(r["parameters"], r[key], r["run"]) for r in sized if r[key] is not None]
        if not points:
            continue
        fig, ax = _figure((4.5, 3.2))
        ax.plot([p[0] for p in points], [p[1] for p in points], "o-")
        for x, y, label in points:
            ax.annotate(label, (x, y), fontsize=7, xytext=(3, 3), textcoords="offset points")
        ax.set_xscale("log")
        ax.set_xlabel("parameters")
        where = f" (layer {', '.join(map(str, layers))})" if key.startswith("geometry_effect") and layers else ""
        ax.set_ylabel(key.replace("_", " ") + where)
        save(fig, Path(out_dir) / f"{key}.png")


# ---------------------------------------------------------------------------- mitigation arms


def error_bars(values, intervals) -> np.ndarray:
    """[2, n] distances from each value down and up to its interval's ends (0 without an interval), never
    negative: a Wilson interval of a rate of 0 can start a rounding error above it (6.9e-18)."""
    bars = [(v - ci[0], ci[1] - v) if ci else (0.0, 0.0) for v, ci in zip(values, intervals)]
    return np.maximum(np.asarray(bars, np.float64).T, 0.0)


def plot_rates(results: Mapping[str, Mapping], path) -> None:
    """One bar per arm with its Wilson interval; an arm with no coherent answer says "no data" (no bar)."""
    fig, ax = _figure((max(4, 0.9 * len(results)), 3.2))
    names = list(results)
    ax.set_title("mitigation arms (95% Wilson CI)")
    if all(results[a]["rate"] is None for a in names):
        no_data(ax)
    else:
        for x, arm in enumerate(names):
            rate, ci = results[arm]["rate"], results[arm]["ci"]
            if rate is None:
                no_data(ax, x)
                continue
            ax.bar(x, rate, yerr=error_bars([rate], [ci]), capsize=3, color="tab:red", alpha=0.7)
        ax.set_xticks(range(len(names)), names, rotation=30, ha="right")
        ax.set_ylabel("misaligned / coherent answers")
    save(fig, path)


def plot_margins(results: Mapping[str, Mapping], path) -> None:
    """Each arm's margin with its interval, each training seed a dot; an arm without one says "no data"."""
    fig, ax = _figure((max(4, 0.9 * len(results)), 3.2))
    names = list(results)
    ax.set_title("margin per arm (95% CI; dots: seeds)")
    for x, arm in enumerate(names):
        m = results[arm]["margin"] or {}
        if m.get("mean") is None:
            no_data(ax, x)
            continue
        ax.errorbar(x, m["mean"], yerr=error_bars([m["mean"]], [m["ci"]]), marker="o", capsize=3, color="tab:blue")
        seeds = [v for v in m["per_seed"] if v is not None]
        ax.scatter([x + 0.15] * len(seeds), seeds, s=10, color="black", zorder=3)
    ax.set_xticks(range(len(names)), names, rotation=30, ha="right")
    ax.set_ylabel("log p misaligned - log p aligned")
    save(fig, path)


def plot_curve(curve: Sequence[Mapping], path) -> None:
    """The `none` arm's pooled rate along training; points without a rate are marked "no data" (never drawn as 0)."""
    fig, ax = _figure((4.5, 3.2))
    ax.set_title("the whole mix (none) along training, 95% Wilson CI")
    defined = [p for p in curve if p["rate"] is not None]
    if not defined:
        no_data(ax)
    else:
        rates = [p["rate"] for p in defined]
        ax.errorbar([p["fraction"] for p in defined], rates, yerr=error_bars(rates, [p["ci"] for p in defined]),
                    marker="o", capsize=3, color="tab:red")  # fmt: skip
        for p in curve:
            if p["rate"] is None:
                no_data(ax, p["fraction"])
        ax.set_xlim(0, 1.05)
        ax.set_xlabel("fraction of training")
        ax.set_ylabel("misaligned / coherent answers")
    save(fig, path)
