"""features: per study dataset (a variant each), its conversations through the base model and each
layer's SAE, streamed (emjax.feature_stats): per-feature statistics, per-sample pooled codes and
mean residuals. Nothing per token is stored.

Writes `<run_dir>/features/<dataset>/` with stream_features' layout (layer{L}/stats.safetensors,
layer{L}/samples.safetensors, summary.json), `kept.npy` (which samples of the dataset have counted
tokens, in order) and `scores.npy` for text-with-score sets.
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

import numpy as np

from emjax import artifacts, distributed, feature_stats, models
from emjax.data import chat, study
from emjax.pipeline import Stage
from emjax.stages.common import built_checkpoint, load_stage_sae, sae_layers, source_path

_log = logging.getLogger(__name__)


def run(ctx, out: Path, variant: str) -> dict:
    cfg = ctx.config
    samples = study.read_dataset(variant, cfg.datasets[variant], seed=cfg.seed)
    tok = models.load_tokenizer(ctx.output("tokenize") / "tokenizer")
    max_length = cfg.features.max_length or cfg.data.max_length
    tokens, attention, count_mask, kept = chat.count_rows(tok, samples, max_length, cfg.features.tokens)
    _log.info("features/%s: %d of %d samples have counted tokens", variant, len(kept), len(samples))
    layers = sae_layers(ctx)
    model = models.load(built_checkpoint(ctx), dtype=cfg.model.dtype, mesh=ctx.mesh, rules=ctx.rules)
    saes = {layer: load_stage_sae(ctx, layer) for layer in layers}
    forward = models.jit_forward(model, capture=tuple(layers), stop_at_layer=max(layers) + 1)
    summary = feature_stats.stream_features(
        forward, saes, tokens, attention, count_mask, out, mesh=ctx.mesh, rules=ctx.rules,
        batch_size=cfg.features.batch_size, rows_per_chunk=cfg.features.chunk_rows, top_codes=cfg.features.top_codes,
    )  # fmt: skip
    if distributed.is_main_process():
        artifacts.save_npy(out / "kept.npy", kept)
        scores = [s.score for s in samples]
        if all(s is not None for s in scores):
            artifacts.save_npy(out / "scores.npy", np.asarray(scores, np.float64)[kept])
        shutil.rmtree(out / "chunks", ignore_errors=True)  # the resume unit; combined into layer{L}/ now
    dataset = cfg.datasets[variant]
    return {
        "dataset": variant,
        "role": dataset.role,
        "domain": dataset.domain,
        "samples": len(samples),
        "kept": len(kept),
        "tokens_counted": cfg.features.tokens,
        "layers": layers,
        **{k: v for k, v in summary.items() if k != "layers"},
        "quality": {str(layer): s["quality"] for layer, s in summary["layers"].items()},
    }


STAGE = Stage(
    "features", run,
    sections=("seed", "data.max_length", "model.dtype", "features.tokens", "features.batch_size",
              "features.max_length", "features.chunk_rows", "features.top_codes", "datasets.{variant}"),
    inputs=("tokenize", "build", "sae"),
    variants=lambda cfg: sorted(cfg.datasets),
    external=lambda cfg, variant: source_path(cfg.datasets[variant].source),
)  # fmt: skip
