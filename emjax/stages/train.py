"""train: LoRA fine-tuning of the built model on train.source (else data.source), written as a PEFT adapter."""

from __future__ import annotations

import dataclasses
import logging
import shutil
from pathlib import Path

from emjax import distributed, lora, models, train
from emjax.data import chat
from emjax.pipeline import Stage
from emjax.stages.common import built_checkpoint, read_chats, source_path

_log = logging.getLogger(__name__)


def run(ctx, out: Path) -> dict:
    cfg = ctx.config
    tok = models.load_tokenizer(ctx.output("tokenize") / "tokenizer")
    source = cfg.train.source or cfg.data.source
    # The synthetic corpus has no natural size: it takes data.num_samples unless train.num_samples is set.
    limit = cfg.train.num_samples or (cfg.data.num_samples if source == "synthetic" else None)
    chats = read_chats(source, limit, cfg.seed)
    rows, report = chat.build_rows(tok, chats, cfg.train.max_length or cfg.data.max_length, pack=cfg.train.pack)
    train_index, heldout_index = chat.split_heldout(len(rows), cfg.train.eval_fraction, cfg.seed)
    _log.info(
        "train: %d conversations -> %d rows (%d truncated, %d without an assistant token dropped), %d held out",
        report.examples, report.rows, report.truncated, report.dropped, len(heldout_index),
    )  # fmt: skip
    checkpoint = built_checkpoint(ctx)
    model = models.load(checkpoint, dtype=cfg.model.dtype, mesh=ctx.mesh, rules=ctx.rules)
    lora.attach(model, cfg.lora, seed=cfg.seed, mesh=ctx.mesh, rules=ctx.rules)
    history = train.finetune(
        model, rows.take(train_index), rows.take(heldout_index) if len(heldout_index) else None, cfg.train,
        out_dir=out, seed=cfg.seed, mesh=ctx.mesh, rules=ctx.rules,
    )  # fmt: skip
    lora.save_peft(model, out / "adapter", config=cfg.lora, base_model=str(checkpoint.resolve()))
    if distributed.is_main_process():
        shutil.rmtree(out / "checkpoints")  # only needed to resume; the adapter is the result
    steps = [r for r in history if "loss" in r]
    evals = [r for r in history if "eval_loss" in r]
    return {
        "adapter": "adapter",
        "metrics": "metrics.jsonl",
        "steps": steps[-1]["step"],
        "first_loss": steps[0]["loss"],
        "final_loss": steps[-1]["loss"],
        "eval_loss": evals[-1]["eval_loss"] if evals else None,
        "data": dataclasses.asdict(report),
    }


STAGE = Stage(
    "train", run, sections=("seed", "data", "model.dtype", "lora", "train"), inputs=("tokenize", "build"),
    external=lambda cfg, variant: source_path(cfg.train.source or cfg.data.source),
)  # fmt: skip
