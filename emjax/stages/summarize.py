"""summarize: streaming statistics of the extracted residual streams, logged and written as JSON."""

from __future__ import annotations

import logging
from pathlib import Path

from emjax import artifacts, distributed, extract
from emjax.pipeline import Stage

_log = logging.getLogger(__name__)


def run(ctx, out: Path) -> dict:
    layers = ctx.manifest("extract")["layers"]
    stats = {}
    for layer in layers:
        files = sorted((ctx.output("extract") / f"layer{layer}").glob("*.npy"))
        stats[layer] = extract.summarize_layer(files)
    if distributed.is_main_process():
        artifacts.write_json(out / "summary.json", stats)
    lines = [f"{'layer':>5} {'tokens':>8} {'mean |h|':>10} {'p50 |h|':>10} {'p95 |h|':>10}  top outlier dims"]
    for layer, s in stats.items():
        dims = ", ".join(f"{o['dim']}:{o['mean']:+.2f}" for o in s["outlier_dims"][:3])
        lines.append(
            f"{layer:>5} {s['tokens']:>8} {s['norm']['mean']:>10.3f} {s['norm']['p50']:>10.3f} "
            f"{s['norm']['p95']:>10.3f}  {dims}"
        )
    _log.info("residual stream summary\n%s", "\n".join(lines))
    return {"layers": layers, "summary": "summary.json"}


STAGE = Stage("summarize", run, inputs=("extract",))
