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
    _log.info("residual stream summary\n%s", extract.summary_table(stats))
    return {"layers": layers, "summary": "summary.json"}


STAGE = Stage("summarize", run, inputs=("extract",))
