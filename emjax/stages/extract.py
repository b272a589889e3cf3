"""extract: residual streams of data.source at extract.layers, in resumable shard files (position 0 and
BOS tokens left out: emjax.extract.text_tokens)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from emjax import config as config_lib
from emjax import extract, models
from emjax.pipeline import Stage
from emjax.stages.common import built_checkpoint


def run(ctx, out: Path) -> dict:
    cfg = ctx.config
    tokens = np.load(ctx.output("tokenize") / "tokens.npy")
    mask = np.load(ctx.output("tokenize") / "mask.npy")
    keep = extract.text_tokens(tokens, mask, models.load_tokenizer(ctx.output("tokenize") / "tokenizer").bos_token_id)
    model = models.load(built_checkpoint(ctx), dtype=cfg.model.dtype, mesh=ctx.mesh, rules=ctx.rules)
    layers = tuple(sorted(set(cfg.extract.layers)))
    num_layers = model.config.num_layers
    if not layers or not all(0 <= layer < num_layers for layer in layers):
        raise config_lib.ConfigError(
            f"extract.layers={cfg.extract.layers}: each layer must be in 0..{num_layers - 1} for this model"
        )
    forward = models.jit_forward(model, capture=layers, stop_at_layer=max(layers) + 1)
    summary = extract.extract_residuals(
        forward,
        tokens,
        mask,
        out,
        layers=layers,
        batch_size=cfg.extract.batch_size,
        rows_per_shard=cfg.extract.rows_per_shard,
        mesh=ctx.mesh,
        rules=ctx.rules,
        dtype=cfg.extract.dtype,
        keep=keep,
    )
    return summary | {"layers": list(layers), "d_model": model.config.hidden_size, "left_out": "position 0 and BOS"}


STAGE = Stage("extract", run, sections=("model.dtype", "extract"), inputs=("tokenize", "build"))
