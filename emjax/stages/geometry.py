"""geometry: the paper's first claim, per layer and per inducing/control pair (emjax.geometry_claim): the
inducing, control and toxic features selected from the features stage's pooled codes, and every test of their
proximity, Holm-adjusted as one family.

Writes `<run_dir>/geometry/`: selected.json (every selected feature with its statistics and
logit-lens tokens), report.json, table.md, proximity_<dataset>.png, max_cosine_layer{L}.png and
neighbours_layer{L}.safetensors (each feature's nearest features in its dictionary).
"""

from __future__ import annotations

from pathlib import Path

from emjax import distributed, geometry_claim, models
from emjax.pipeline import Stage
from emjax.stages.common import built_checkpoint, load_stage_sae, sae_layers


def run(ctx, out: Path) -> dict:
    cfg = ctx.config
    model = models.load(built_checkpoint(ctx), dtype=cfg.model.dtype, mesh=ctx.mesh, rules=ctx.rules)
    tok = models.load_tokenizer(ctx.output("tokenize") / "tokenizer")
    saes = {layer: load_stage_sae(ctx, layer) for layer in sae_layers(ctx)}
    dirs = {name: ctx.output("features", name) for name in cfg.datasets}
    result = geometry_claim.analyse(cfg, dirs, saes, model, tok, mesh=ctx.mesh)
    if distributed.is_main_process():
        geometry_claim.write(result, out, cfg.geometry)
    return {"pairs": [list(p) for p in geometry_claim.pairs(cfg)], "table": result["table"], "report": "report.json"}


STAGE = Stage(
    "geometry", run,
    sections=("seed", "model.dtype", "datasets", "features.method", "features.toxic_method", "features.top_n",
              "features.max_density", "features.logit_lens", "geometry"),
    inputs=("tokenize", "build", "sae", "features"),
)  # fmt: skip
