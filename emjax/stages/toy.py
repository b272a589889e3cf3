"""toy: the toy model of superposition (emjax.toy), where the true feature directions are known:
amplification of planted toxic features against their cosine to the fine-tuned target, the
first-order prediction, and the filtering and training arms. Writes toy.json and its plots."""

from __future__ import annotations

from pathlib import Path

from emjax import toy
from emjax.pipeline import Stage


def run(ctx, out: Path) -> dict:
    result = toy.run_toy(ctx.config.toy, out)
    return {"toy": "toy.json", "fit": result.get("fit"), "filter": result["filter"], "target": result["target"]}


STAGE = Stage("toy", run, sections=("toy",))
