"""mitigate: the paper's third claim, the mitigation arms compared (emjax.arm_comparison.compare_arms: per arm its
misaligned rate and margin over its training seeds, their reductions against `none`, what the filter removed,
the task cost, the toxic features' shift, the power of the comparison and claim 3's Holm-adjusted tests), and
the `none` arm along training (emjax.arm_comparison.none_over_training).

Writes `<run_dir>/mitigate/comparison.json`, table.md, rates.png, margins.png and none_over_training.png.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from emjax import arm_comparison, artifacts, distributed, evaluate, margin, mitigate, plots, train
from emjax.pipeline import Stage
from emjax.variant import Variant, curve_variants, mix_variants


def scores_of(ctx, variant: str) -> list[dict]:
    """An evaluated variant's judged answers (a damaged file is an error naming it)."""
    return evaluate.read_rows(ctx.output("evaluate", variant) / "scores.csv", evaluate.SCORED)


def evaluated(ctx, variant: str) -> arm_comparison.Evaluated:
    """What the comparison reads of an evaluated mitigation fine-tune or point along its training."""
    v = Variant.parse(variant)
    evaluation = ctx.manifest("evaluate", variant)
    measured = evaluation.get("margin") and not v.along
    margins = margin.read_margins(ctx.output("evaluate", variant) / "margin.json") if measured else None
    shift = {} if v.along else ctx.manifest("derivation", variant).get("summary") or {}
    trained = ctx.manifest("train", str(v.trained))
    return arm_comparison.Evaluated(variant, v.seed, scores_of(ctx, variant), evaluation, trained,
                                    {layer: s["toxic_shift"] for layer, s in shift.items()}, margins)  # fmt: skip


def run(ctx, out: Path) -> dict:
    cfg, e = ctx.config, ctx.config.evaluate
    tunes = {v: evaluated(ctx, v) for v in mix_variants(cfg) + curve_variants(cfg)}
    arms: dict[str, list[arm_comparison.Evaluated]] = {}
    for variant in mix_variants(cfg):
        arms.setdefault(Variant.parse(variant).arm, []).append(tunes[variant])
    # The coherence filter applies only if the evaluation applied it to every variant (a probe judge may not
    # be able to flag).
    records = [t.evaluation.get("coherence_filter") or {"applied": True} for t in tunes.values()]
    off = [r for r in records if not r["applied"]]
    coherence = {"applied": not off, "reason": off[0].get("reason") if off else None}
    thresholds = dict(aligned_below=e.aligned_below, coherent_above=e.coherent_above if coherence["applied"] else None)
    comparison = arm_comparison.compare_arms(
        arms, selections=json.loads((ctx.output("filter") / "arms.json").read_text()), thresholds=thresholds,
        seeds=len(cfg.mitigate.train_seeds), seed=cfg.seed,
    )  # fmt: skip
    none = arms.get("none", [])
    points = [(f, train.curve_label(f)) for f in sorted(cfg.mitigate.curve)] + [(1.0, None)]
    curve = arm_comparison.none_over_training(
        [(f, label, [tunes[str(Variant.parse(t.name).at(label))] for t in none]) for f, label in points],
        thresholds,
    )  # fmt: skip
    table, power = comparison.pop("table"), comparison["power"]
    power_line = arm_comparison.power_line(power)
    if distributed.is_main_process():
        artifacts.write_json(out / "comparison.json", comparison | {
            "none_over_training": curve, "recipe_differences": mitigate.recipe_differences(cfg.lora, cfg.train),
            "coherence_filter": coherence,
        })  # fmt: skip
        note = "" if coherence["applied"] else f"\nCoherence filter not applied: {coherence['reason']}.\n"
        artifacts.write_text(out / "table.md", plots.markdown_table(table) + note + "\n" + power_line + "\n\n")
        plots.plot_rates(comparison["arms"], out / "rates.png")
        if any(res["margin"] for res in comparison["arms"].values()):
            plots.plot_margins(comparison["arms"], out / "margins.png")
        if len(curve) > 1:
            plots.plot_curve(curve, out / "none_over_training.png")
    logging.getLogger(__name__).info("mitigation:\n%s\n%s", plots.markdown_table(table), power_line)
    return {"arms": list(comparison["arms"]), "table": table, "power": power, "none_over_training": curve,
            "comparison": "comparison.json"}  # fmt: skip


STAGE = Stage(
    "mitigate", run,
    sections=("seed", "evaluate.aligned_below", "evaluate.coherent_above", "mitigate", "datasets", "lora", "train"),
    inputs=("filter", "train", "evaluate", "derivation"),
    reads=lambda cfg, variant: {"filter": [None], "train": mix_variants(cfg),
                                "evaluate": mix_variants(cfg) + curve_variants(cfg), "derivation": mix_variants(cfg)},
)  # fmt: skip
