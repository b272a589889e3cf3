"""tokenize: the tokenizer (trained here or the checkpoint's) and data.source as padded token rows
(data.source=study: the conversations of every study dataset, interleaved: what the SAEs train on)."""

from __future__ import annotations

import logging
from pathlib import Path

from emjax import artifacts, distributed, models
from emjax import config as config_lib
from emjax.data import study, synthetic, tokenizer
from emjax.pipeline import Stage
from emjax.stages.common import checkpoint_input, read_chats, source_path

_log = logging.getLogger(__name__)


def run(ctx, out: Path) -> dict:
    cfg = ctx.config
    if cfg.data.source == "study":
        chats = study.study_mix(cfg.datasets, cfg.data.num_samples, seed=cfg.seed)
    else:
        chats = read_chats(cfg.data.source, cfg.data.num_samples, cfg.seed)
    if cfg.tokenizer.train:
        # The planted study sets' phrases too, so the tiny default's datasets tokenize without unknowns.
        texts = [m["content"] for c in chats for m in c] + synthetic.study_texts()
        tok = tokenizer.train_chat_tokenizer(texts, cfg.tokenizer.vocab_size)
    else:
        tok = models.load_tokenizer(cfg.tokenizer.path or config_lib.checkpoint_path(cfg.model))
    if distributed.is_main_process():
        tok.save_pretrained(out / "tokenizer")
    tokens, mask, truncated = tokenizer.chat_rows(tok, chats, cfg.data.max_length)
    if truncated:
        _log.warning("tokenize: %d of %d conversations truncated to %d tokens", truncated, len(chats),
                     cfg.data.max_length)  # fmt: skip
    if distributed.is_main_process():
        artifacts.save_npy(out / "tokens.npy", tokens)
        artifacts.save_npy(out / "mask.npy", mask)
    return {"rows": len(chats), "real_tokens": int(mask.sum()), "truncated": truncated, "vocab": len(tok)}


def external(cfg, variant) -> dict:
    if cfg.data.source == "study":
        found = {f"dataset:{name}": path for name, d in cfg.datasets.items() for path in source_path(d.source).values()}
    else:
        found = source_path(cfg.data.source)
    if cfg.tokenizer.path:
        found["tokenizer"] = cfg.tokenizer.path
    elif not cfg.tokenizer.train:
        found |= checkpoint_input(cfg.model)
    return found


STAGE = Stage(
    "tokenize", run,
    sections=("seed", "data", "datasets", "tokenizer", "model.checkpoint", "model.checkpoint_env", "model.arch"),
    external=external,
)  # fmt: skip
