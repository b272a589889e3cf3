"""mitigate: the paper's third claim, the comparison of the mitigation arms.

For every arm (filter's: none, geometry-<rule>, random-<seed>, judge; training arms: ablation,
randdir, penalty), the misaligned rate of its fine-tunes (one per training seed) with a Wilson
interval over the pooled answers, the per-seed rates, the relative reduction against `none` with
bootstrap intervals over answers and over seeds, what the filter removed (share of inducing
samples: precision and recall) and what the arm cost the task (held-out loss of the fine-tunes).

Writes `<run_dir>/mitigate/comparison.json`, table.md and rates.png.
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


def run(ctx, out: Path) -> dict:
    cfg = ctx.config
    e = cfg.evaluate
    arms_json = json.loads((ctx.output("filter") / "arms.json").read_text())
    by_arm: dict[str, list[str]] = {}
    for variant in train_stage.mix_variants(cfg):
        by_arm.setdefault(train_stage.parse_mix(variant)[0], []).append(variant)
    results, flags = {}, {}
    for arm, variants in by_arm.items():
        rows = [r for v in variants for r in evaluate.read_rows(ctx.output("evaluate", v) / "scores.csv")]
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
            "answers": pooled["n"],
            "seed_rates": per_seed,
            "heldout_task_loss": float(np.mean([x for x in losses if x is not None])) if any(losses) else None,
            "selection": arms_json.get(arm, {}).get("selection"),
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
            "reduction": res.get("reduction_over_answers", {}).get("reduction"),
            "inducing share removed (precision)": (res["selection"] or {}).get("precision"),
            "recall": (res["selection"] or {}).get("recall"),
            "held-out task loss": res["heldout_task_loss"],
        }
        for arm, res in results.items()
    ]
    if distributed.is_main_process():
        comparison = {"arms": results, "recipe_differences": ctx.manifest("filter")["recipe_differences"]}
        artifacts.write_json(out / "comparison.json", comparison)
        artifacts.write_text(out / "table.md", geometry.markdown_table(table) + "\n")
        plot_rates(results, out / "rates.png")
    logging.getLogger(__name__).info("mitigation:\n%s", geometry.markdown_table(table))
    return {"arms": list(results), "table": table, "comparison": "comparison.json"}


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


STAGE = Stage(
    "mitigate", run,
    sections=("seed", "evaluate.aligned_below", "evaluate.coherent_above", "mitigate", "datasets"),
    inputs=("filter", "train", "evaluate"),
    reads=lambda cfg, variant: {"filter": [None], "train": train_stage.mix_variants(cfg),
                                "evaluate": train_stage.mix_variants(cfg)},
)  # fmt: skip
