"""The scale sweep: one number per claim for each run (models, scales), in one table with plots of each
effect against parameter count.

    python -m emjax.sweep RUN_A RUN_B ... --out=DIR   # DIR/sweep.json, sweep.md and one PNG per effect

Each run is read as its report reads it (emjax.report.collect): files only.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from emjax import artifacts
from emjax.plots import markdown_table, plot_sweep
from emjax.report import collect

# The effects drawn against parameter count, one plot each.
PLOTTED = ("geometry_effect", "jvp_correlation", "max_finetuned_rate", "geometry_filter_reduction",
           "inducing_margin_minus_base", "geometry_margin_reduction")  # fmt: skip


def effects(report: dict) -> dict:
    """One number per claim for a run (None where the run lacks the stage)."""
    table = (report.get("geometry") or {}).get("table") or []
    earliest = min((r["layer"] for r in table), default=None)
    at_earliest = [r for r in table if r["layer"] == earliest]
    derivation = [
        v
        for name, layers in (report.get("derivation") or {}).items()
        if not name.startswith("mix-")  # the datasets' own fine-tunes, as in the paper
        for v in layers.values()
        if isinstance(v, dict)
    ]
    evaluation = report.get("evaluation") or {}
    tuned = [
        s["overall"]["rate"]
        for name, s in evaluation.items()
        if name != "base" and s and s["overall"]["rate"] is not None
    ]
    arms = (report.get("mitigation") or {}).get("arms") or {}
    geometry_arms = [a for name, a in arms.items() if name.startswith("geometry-") and a.get("reduction_over_answers")]
    margin_arms = [a["margin_reduction"] for name, a in arms.items()
                   if name.startswith("geometry-") and (a.get("margin_reduction") or {}).get("reduction") is not None]
    roles = {name: d.get("role") for name, d in ((report.get("config") or {}).get("datasets") or {}).items()}
    inducing_margins = [((evaluation.get(name) or {}).get("margin") or {}).get("minus_base") or {}
                        for name, role in roles.items() if role == "inducing"]
    inducing_margins = [m["mean"] for m in inducing_margins if m.get("mean") is not None]  # fmt: skip
    return {
        "parameters": (report.get("model") or {}).get("parameters"),
        "geometry_layer": earliest,  # the geometry columns report the earliest SAE layer
        "geometry_effect": (sum(r["effect"] for r in at_earliest) / len(at_earliest)
                            if at_earliest and all(r["effect"] is not None for r in at_earliest) else None),
        "geometry_p_holm": min((r["p_holm"] for r in at_earliest if r.get("p_holm") is not None), default=None),
        "jvp_correlation": sum(d["jvp_vs_measured"] for d in derivation) / len(derivation) if derivation else None,
        "base_rate": ((evaluation.get("base") or {}).get("overall") or {}).get("rate"),
        "max_finetuned_rate": max(tuned) if tuned else None,
        "geometry_filter_reduction": geometry_arms[0]["reduction_over_answers"]["reduction"] if geometry_arms else None,
        "inducing_margin_minus_base": sum(inducing_margins) / len(inducing_margins) if inducing_margins else None,
        "geometry_margin_reduction": margin_arms[0]["reduction"] if margin_arms else None,
    }


def write(runs: Sequence[str | Path], out: str | Path) -> list[dict]:
    """sweep.json, sweep.md and a plot per effect against parameter count in `out`; returns the rows."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for run in runs:
        report = collect(run)
        name = (report.get("config") or {}).get("name") or Path(run).name
        rows.append({"run": name, **effects(report)})
    rows.sort(key=lambda r: (r["parameters"] is None, r["parameters"] or 0))
    artifacts.write_json(out / "sweep.json", rows)
    note = ("`geometry_layer`: the SAE layer the geometry columns report (each run's earliest); "
            "`inducing_margin_minus_base`: the inducing fine-tunes' margin minus the base model's (mean); "
            "`geometry_margin_reduction`: `none`'s margin minus the first geometry arm's.")
    artifacts.write_text(out / "sweep.md", "# Scale sweep\n\n" + markdown_table(rows) + "\n\n" + note + "\n")
    plot_sweep(rows, PLOTTED, out)
    return rows


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m emjax.sweep", description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", help="run directories")
    parser.add_argument("--out", required=True, help="output directory")
    args = parser.parse_args(argv)
    missing = [r for r in args.runs if not Path(r).is_dir()]
    if missing:
        print(f"error: no run directory {missing}", file=sys.stderr)
        return 2
    for row in write(args.runs, args.out):
        print(row)
    return 0


if __name__ == "__main__":
    sys.exit(main())
