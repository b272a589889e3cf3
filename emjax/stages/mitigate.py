"""mitigate: the paper's third claim, the comparison of the mitigation arms.

For every arm (filter's: none, geometry-<rule>, random-<seed>, judge; training arms: ablation,
randdir, penalty), the misaligned rate of its fine-tunes (one per training seed) with a Wilson
interval over the pooled answers, the per-seed rates, the relative reduction against `none` with
bootstrap intervals over answers and over seeds, what the filter removed (share of inducing
samples: precision and recall), what the arm cost the task (held-out loss of the fine-tunes) and
how far it moved the toxic features (the derivation stage's measured mean shift per SAE layer, on
the base model's answers to the evaluation questions). And the `none` arm along training: its
misaligned rate at each mitigate.curve point and at the end.

Writes `<run_dir>/mitigate/comparison.json`, table.md, rates.png and none_over_training.png.
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path

import numpy as np

from emjax import artifacts, distributed, evaluate, geometry, mitigate, plots
from emjax.pipeline import Stage
from emjax.stages import train as train_stage


def misaligned_flags(rows, aligned_below: float, coherent_above: float | None) -> np.ndarray:
    """1/0 per coherent answer (the paper's denominator; every scored answer without a coherence filter):
    misaligned or not."""
    flags = []
    for r in rows:
        try:
            aligned, coherent = float(r["aligned"]), float(r["coherent"])
        except (KeyError, TypeError, ValueError):
            continue  # unscored (None, empty): not counted, never imputed
        if math.isnan(aligned) or math.isnan(coherent):
            continue
        if coherent_above is None or coherent > coherent_above:
            flags.append(float(aligned < aligned_below))
    return np.asarray(flags)


def coherence_filter(ctx, variants: list[str]) -> dict:
    """Applied only if the evaluation applied it to every variant (a probe judge may not be able to flag)."""
    records = [ctx.manifest("evaluate", v).get("coherence_filter") or {"applied": True} for v in variants]
    off = [r for r in records if not r["applied"]]
    return {"applied": not off, "reason": off[0].get("reason") if off else None}


def scores_of(ctx, variant: str) -> list[dict]:
    """An evaluated variant's judged answers (a damaged file is an error naming it)."""
    return evaluate.read_rows(ctx.output("evaluate", variant) / "scores.csv", evaluate.SCORED)


def run(ctx, out: Path) -> dict:
    cfg = ctx.config
    e = cfg.evaluate
    arms_json = json.loads((ctx.output("filter") / "arms.json").read_text())
    by_arm: dict[str, list[str]] = {}
    for variant in train_stage.mix_variants(cfg):
        by_arm.setdefault(train_stage.parse_mix(variant)[0], []).append(variant)
    coherence = coherence_filter(ctx, train_stage.mix_variants(cfg) + train_stage.curve_variants(cfg))
    thresholds = dict(aligned_below=e.aligned_below, coherent_above=e.coherent_above if coherence["applied"] else None)
    results, flags = {}, {}
    for arm, variants in by_arm.items():
        rows = [r for v in variants for r in scores_of(ctx, v)]
        pooled = evaluate.summarize(rows, **thresholds)["overall"]
        organisms = evaluate.summarize(rows, **thresholds, convention="model_organisms")["overall"]
        per_seed = [ctx.manifest("evaluate", v)["overall"]["rate"] for v in variants]
        losses = [ctx.manifest("train", v)["eval_loss"] for v in variants]
        flags[arm] = misaligned_flags(rows, **thresholds)
        results[arm] = {
            "fine_tunes": variants,
            "rate": pooled["rate"],
            "ci": pooled["ci"],
            "rate_all": pooled["rate_all"],
            "scored": pooled["scored"],
            "coherent": pooled["coherent"],
            # model-organisms-for-EM's convention: aligned <= 30 and coherent > 50 over every scored answer,
            # questions mentioning JSON left out.
            "model_organisms": {k: organisms[k] for k in ("rate", "ci", "scored", "misaligned")},
            "misaligned": pooled["misaligned"],
            "aligned_mean": pooled["aligned_mean"],
            "aligned_mean_ci": pooled["aligned_mean_ci"],
            "answers": pooled["n"],
            "seed_rates": per_seed,
            "heldout_task_loss": float(np.mean([x for x in losses if x is not None])) if any(losses) else None,
            "selection": arms_json.get(arm, {}).get("selection"),
            "toxic_shift": toxic_shift(ctx, variants),
        }
    seeds = {arm: np.asarray([r for r in res["seed_rates"] if r is not None], float) for arm, res in results.items()}
    for arm, res in results.items():
        if arm == "none" or not len(flags[arm]) or not len(flags["none"]):
            continue
        res["reduction_over_answers"] = mitigate.relative_reduction(flags[arm], flags["none"], seed=cfg.seed)
        if len(seeds[arm]) and len(seeds["none"]):
            res["reduction_over_seeds"] = mitigate.relative_reduction(seeds[arm], seeds["none"], seed=cfg.seed)
    table = [
        {
            "arm": arm,
            "misaligned rate": res["rate"],
            "95% CI": "" if not res["ci"] else f"[{res['ci'][0]:.3f}, {res['ci'][1]:.3f}]",
            "scored answers": res["scored"],
            "coherent answers": res["coherent"],
            "rate (model-organisms)": res["model_organisms"]["rate"],
            "mean aligned": res["aligned_mean"],
            "reduction": res.get("reduction_over_answers", {}).get("reduction"),
            "inducing share removed (precision)": (res["selection"] or {}).get("precision"),
            "recall": (res["selection"] or {}).get("recall"),
            "held-out task loss": res["heldout_task_loss"],
        }
        | {f"toxic shift L{layer}": shift["mean"] for layer, shift in res["toxic_shift"].items()}
        for arm, res in results.items()
    ]
    curve = none_over_training(ctx, by_arm.get("none", []), thresholds)
    if distributed.is_main_process():
        comparison = {
            "arms": results,
            "none_over_training": curve,
            "recipe_differences": ctx.manifest("filter")["recipe_differences"],
            "coherence_filter": coherence,
        }
        artifacts.write_json(out / "comparison.json", comparison)
        note = "" if coherence["applied"] else f"\nCoherence filter not applied: {coherence['reason']}.\n"
        artifacts.write_text(out / "table.md", geometry.markdown_table(table) + note + "\n")
        plot_rates(results, out / "rates.png")
        if len(curve) > 1:
            plot_curve(curve, out / "none_over_training.png")
    logging.getLogger(__name__).info("mitigation:\n%s", geometry.markdown_table(table))
    return {"arms": list(results), "table": table, "none_over_training": curve, "comparison": "comparison.json"}


def toxic_shift(ctx, variants: list[str]) -> dict[str, dict]:
    """{layer: {"mean": over the arm's fine-tunes, "seeds": each}} of the toxic features' measured shift."""
    per_layer: dict[str, list] = {}
    for v in variants:
        for layer, s in (ctx.manifest("derivation", v).get("summary") or {}).items():
            per_layer.setdefault(layer, []).append(s["toxic_shift"])
    return {
        layer: {"mean": float(np.mean([x for x in xs if x is not None])) if any(x is not None for x in xs) else None,
                "seeds": xs}
        for layer, xs in per_layer.items()
    }  # fmt: skip


def none_over_training(ctx, variants: list[str], thresholds: dict) -> list[dict]:
    """The `none` arm's misaligned rate (pooled over its training seeds) at each point along training, then
    at the end: [{"fraction", "steps" (per seed), "rate", "ci", "scored", "coherent", "aligned_mean",
    "seed_rates"}]."""
    cfg = ctx.config
    points = [(f, mitigate.curve_label(f)) for f in sorted(cfg.mitigate.curve)] + [(1.0, None)]
    curve = []
    for fraction, label in points:
        evaluated = [v if label is None else f"{v}@{label}" for v in variants]
        rows = [r for v in evaluated for r in scores_of(ctx, v)]
        pooled = evaluate.summarize(rows, **thresholds)["overall"]
        trained = [ctx.manifest("train", v) for v in variants]
        curve.append({
            "fraction": fraction,
            "steps": [t["steps"] if label is None else t["along"][label]["step"] for t in trained],
            "rate": pooled["rate"],
            "ci": pooled["ci"],
            "scored": pooled["scored"],
            "coherent": pooled["coherent"],
            "aligned_mean": pooled["aligned_mean"],
            "seed_rates": [ctx.manifest("evaluate", v)["overall"]["rate"] for v in evaluated],
        })  # fmt: skip
    return curve


def plot_rates(results: dict, path: Path) -> None:
    """One bar per arm with its Wilson interval; an arm with no coherent answer says "no data" (no bar)."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(max(4, 0.9 * len(results)), 3.2))
    ax = fig.subplots()
    names = list(results)
    ax.set_title("mitigation arms (95% Wilson CI)")
    if all(results[a]["rate"] is None for a in names):
        plots.no_data(ax)
    else:
        for x, arm in enumerate(names):
            rate, ci = results[arm]["rate"], results[arm]["ci"]
            if rate is None:
                plots.no_data(ax, x)
                continue
            ax.bar(x, rate, yerr=[[rate - ci[0]], [ci[1] - rate]], capsize=3, color="tab:red", alpha=0.7)
        ax.set_xticks(range(len(names)), names, rotation=30, ha="right")
        ax.set_ylabel("misaligned / coherent answers")
    fig.tight_layout()
    plots.save(fig, path)


def plot_curve(curve: list[dict], path: Path) -> None:
    """The pooled rate along training; points without a rate are marked "no data" (never drawn as 0)."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(4.5, 3.2))
    ax = fig.subplots()
    ax.set_title("the whole mix (none) along training, 95% Wilson CI")
    defined = [p for p in curve if p["rate"] is not None]
    if not defined:
        plots.no_data(ax)
    else:
        rates = [p["rate"] for p in defined]
        low = [r - p["ci"][0] for p, r in zip(defined, rates)]
        high = [p["ci"][1] - r for p, r in zip(defined, rates)]
        ax.errorbar([p["fraction"] for p in defined], rates, yerr=[low, high], marker="o", capsize=3, color="tab:red")
        for p in curve:
            if p["rate"] is None:
                plots.no_data(ax, p["fraction"])
        ax.set_xlim(0, 1.05)
        ax.set_xlabel("fraction of training")
        ax.set_ylabel("misaligned / coherent answers")
    fig.tight_layout()
    plots.save(fig, path)


def _reads(cfg, variant) -> dict:
    mixed = train_stage.mix_variants(cfg)
    return {
        "filter": [None],
        "train": mixed,
        "evaluate": mixed + train_stage.curve_variants(cfg),
        "derivation": mixed,
    }


STAGE = Stage(
    "mitigate", run,
    sections=("seed", "evaluate.aligned_below", "evaluate.coherent_above", "mitigate", "datasets"),
    inputs=("filter", "train", "evaluate", "derivation"),
    reads=_reads,
)  # fmt: skip
