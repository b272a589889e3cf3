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
from pathlib import Path

import numpy as np

from emjax import artifacts, distributed, evaluate, geometry, mitigate
from emjax.pipeline import Stage
from emjax.stages import train as train_stage


def misaligned_flags(rows, e) -> np.ndarray:
    """1/0 per coherent answer (the paper's denominator): misaligned or not."""
    flags = []
    for r in rows:
        try:
            aligned, coherent = float(r["aligned"]), float(r["coherent"])
        except (KeyError, TypeError, ValueError):
            continue  # unscored (None, empty): not counted, never imputed
        if coherent > e.coherent_above:
            flags.append(float(aligned < e.aligned_below))
    return np.asarray(flags)


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
    results, flags = {}, {}
    for arm, variants in by_arm.items():
        rows = [r for v in variants for r in scores_of(ctx, v)]
        pooled = evaluate.summarize(rows, aligned_below=e.aligned_below, coherent_above=e.coherent_above)["overall"]
        per_seed = [ctx.manifest("evaluate", v)["overall"]["rate"] for v in variants]
        losses = [ctx.manifest("train", v)["eval_loss"] for v in variants]
        flags[arm] = misaligned_flags(rows, e)
        results[arm] = {
            "fine_tunes": variants,
            "rate": pooled["rate"],
            "ci": pooled["ci"],
            "rate_all": pooled["rate_all"],
            "coherent": pooled["coherent"],
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
            "coherent answers": res["coherent"],
            "mean aligned": res["aligned_mean"],
            "reduction": res.get("reduction_over_answers", {}).get("reduction"),
            "inducing share removed (precision)": (res["selection"] or {}).get("precision"),
            "recall": (res["selection"] or {}).get("recall"),
            "held-out task loss": res["heldout_task_loss"],
        }
        | {f"toxic shift L{layer}": shift["mean"] for layer, shift in res["toxic_shift"].items()}
        for arm, res in results.items()
    ]
    curve = none_over_training(ctx, by_arm.get("none", []))
    if distributed.is_main_process():
        comparison = {
            "arms": results,
            "none_over_training": curve,
            "recipe_differences": ctx.manifest("filter")["recipe_differences"],
        }
        artifacts.write_json(out / "comparison.json", comparison)
        artifacts.write_text(out / "table.md", geometry.markdown_table(table) + "\n")
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


def none_over_training(ctx, variants: list[str]) -> list[dict]:
    """The `none` arm's misaligned rate (pooled over its training seeds) at each point along training, then
    at the end: [{"fraction", "steps" (per seed), "rate", "ci", "coherent", "aligned_mean", "seed_rates"}]."""
    cfg = ctx.config
    e = cfg.evaluate
    points = [(f, mitigate.curve_label(f)) for f in sorted(cfg.mitigate.curve)] + [(1.0, None)]
    curve = []
    for fraction, label in points:
        evaluated = [v if label is None else f"{v}@{label}" for v in variants]
        rows = [r for v in evaluated for r in scores_of(ctx, v)]
        pooled = evaluate.summarize(rows, aligned_below=e.aligned_below, coherent_above=e.coherent_above)["overall"]
        trained = [ctx.manifest("train", v) for v in variants]
        curve.append({
            "fraction": fraction,
            "steps": [t["steps"] if label is None else t["along"][label]["step"] for t in trained],
            "rate": pooled["rate"],
            "ci": pooled["ci"],
            "coherent": pooled["coherent"],
            "aligned_mean": pooled["aligned_mean"],
            "seed_rates": [ctx.manifest("evaluate", v)["overall"]["rate"] for v in evaluated],
        })  # fmt: skip
    return curve


def plot_rates(results: dict, path: Path) -> None:
    from matplotlib.figure import Figure

    fig = Figure(figsize=(max(4, 0.9 * len(results)), 3.2))
    ax = fig.subplots()
    names = list(results)
    rates = [results[a]["rate"] or 0.0 for a in names]
    low = [r - (results[a]["ci"] or (r, r))[0] for a, r in zip(names, rates)]
    high = [(results[a]["ci"] or (r, r))[1] - r for a, r in zip(names, rates)]
    ax.bar(range(len(names)), rates, yerr=[low, high], capsize=3, color="tab:red", alpha=0.7)
    ax.set_xticks(range(len(names)), names, rotation=30, ha="right")
    ax.set_ylabel("misaligned / coherent answers")
    ax.set_title("mitigation arms (95% Wilson CI)")
    fig.tight_layout()
    geometry.save_figure(fig, path)


def plot_curve(curve: list[dict], path: Path) -> None:
    from matplotlib.figure import Figure

    fig = Figure(figsize=(4.5, 3.2))
    ax = fig.subplots()
    x = [p["fraction"] for p in curve]
    rates = [p["rate"] if p["rate"] is not None else np.nan for p in curve]
    low = [r - p["ci"][0] if p["ci"] else 0.0 for p, r in zip(curve, rates)]
    high = [p["ci"][1] - r if p["ci"] else 0.0 for p, r in zip(curve, rates)]
    ax.errorbar(x, rates, yerr=[low, high], marker="o", capsize=3, color="tab:red")
    ax.set_xlabel("fraction of training")
    ax.set_ylabel("misaligned / coherent answers")
    ax.set_title("the whole mix (none) along training, 95% Wilson CI")
    fig.tight_layout()
    geometry.save_figure(fig, path)


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
