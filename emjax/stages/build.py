"""build: the model, checked against the tokenizer; a tiny config's random model is saved here."""

from __future__ import annotations

import shutil
from pathlib import Path

import jax
from flax import nnx

from emjax import config as config_lib
from emjax import distributed, models
from emjax.models import gguf
from emjax.models.checkpoint import Checkpoint
from emjax.models.gguf import GGUFCheckpoint
from emjax.pipeline import Stage
from emjax.stages.common import checkpoint_input


def run(ctx, out: Path) -> dict:
    cfg = ctx.config
    tok_dir = ctx.output("tokenize") / "tokenizer"
    vocab = ctx.manifest("tokenize")["vocab"]
    if cfg.model.arch is None:
        path = config_lib.checkpoint_path(cfg.model)
        ckpt = GGUFCheckpoint(path) if gguf.is_gguf(path) else Checkpoint(path)
        where = str(path) if gguf.is_gguf(path) else str(path / "config.json")
        family = models.family_of(ckpt.config, where)
        if ckpt.config["vocab_size"] < vocab:
            raise config_lib.ConfigError(f"{where}: vocab_size {ckpt.config['vocab_size']} < tokenizer size {vocab}")
        parameters = models.parameter_count(ckpt.config)
        if not gguf.is_gguf(path):
            return {"checkpoint": str(path.resolve()), "architecture": family.architecture, "parameters": parameters}
        # Dequantised once into safetensors here: every later stage then loads it in a fraction of the time.
        if distributed.is_main_process():
            gguf.convert(path, out / "model", dtype=cfg.model.dtype, tokenizer=False)
            for f in tok_dir.iterdir():
                shutil.copy(f, out / "model" / f.name)
        return {
            "checkpoint": "model",
            "architecture": family.architecture,
            "parameters": parameters,
            "converted_from": str(path.resolve()),
        }
    # Round the embedding table up to a multiple of 128 rows so it splits over any tensor axis.
    arch = {"vocab_size": -(-vocab // 128) * 128} | cfg.model.arch
    model = models.build(arch, seed=cfg.seed, dtype=cfg.model.dtype, mesh=ctx.mesh, rules=ctx.rules)
    models.save(model, out / "model")
    if distributed.is_main_process():
        for f in tok_dir.iterdir():
            shutil.copy(f, out / "model" / f.name)
    params = sum(p.size for p in jax.tree.leaves(nnx.state(model, nnx.Param)))
    # Relative to the stage directory, so a copied or moved run directory stays whole.
    return {"checkpoint": "model", "parameters": params}


STAGE = Stage("build", run, sections=("seed", "model"), inputs=("tokenize",),
              external=lambda cfg, variant: checkpoint_input(cfg.model))  # fmt: skip
