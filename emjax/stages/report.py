"""report: the run's report page (emjax.report): report/report.md with its plots, and report.json."""

from __future__ import annotations

from pathlib import Path

from emjax import distributed, report
from emjax.pipeline import Stage

READ = ("sae", "geometry", "derivation", "evaluate", "mitigate", "toy")


def run(ctx, out: Path) -> dict:
    if distributed.is_main_process():
        report.write(ctx.run_dir, out)
    return {"report": "report.md", "json": "report.json"}


STAGE = Stage(
    "report", run, sections=("stages",), inputs=READ,
    reads=lambda cfg, variant: {stage: None for stage in READ if stage in cfg.stages},
)  # fmt: skip
