"""The pipeline's stages, in order: tokenize -> build -> extract -> summarize -> train."""

from __future__ import annotations

import dataclasses
import json
import logging
import shutil
from pathlib import Path

import jax
import numpy as np
from flax import nnx

from emjax import config as config_lib
from emjax import distributed, extract, lora, models, train
from emjax.artifacts import write_text as atomic_write_text
from emjax.data import chat, synthetic, tokenizer
from emjax.models.checkpoint import Checkpoint
from emjax.pipeline import Context, Stage

_log = logging.getLogger(__name__)


def _chats(source: str, limit: int | None, seed: int):
    """Conversations from the synthetic corpus (`limit` of them) or a chat dataset."""
    if source == "synthetic":
        return synthetic.synthetic_chats(limit, seed=seed)
    return chat.read_chats(source, limit=limit)


def run_tokenize(ctx: Context, out: Path) -> dict:
    cfg = ctx.config
    chats = _chats(cfg.data.source, cfg.data.num_samples, cfg.seed)
    if cfg.tokenizer.train:
        tok = tokenizer.train_chat_tokenizer((m["content"] for c in chats for m in c), cfg.tokenizer.vocab_size)
    else:
        tok = models.load_tokenizer(cfg.tokenizer.path or config_lib.checkpoint_path(cfg.model))
    if distributed.is_main_process():
        tok.save_pretrained(out / "tokenizer")
    texts = [tok.apply_chat_template(chat, tokenize=False) for chat in chats]
    encoded = tok(texts, add_special_tokens=False)["input_ids"]
    length = cfg.data.max_length
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    tokens = np.full((len(encoded), length), pad, np.int32)
    mask = np.zeros((len(encoded), length), np.int8)
    for row, ids in enumerate(encoded):
        ids = ids[:length]
        tokens[row, : len(ids)] = ids
        mask[row, : len(ids)] = 1
    truncated = sum(len(ids) > length for ids in encoded)
    if truncated:
        _log.warning("tokenize: %d of %d conversations truncated to %d tokens", truncated, len(encoded), length)
    if distributed.is_main_process():
        np.save(out / "tokens.npy", tokens)
        np.save(out / "mask.npy", mask)
    return {"rows": len(encoded), "real_tokens": int(mask.sum()), "truncated": truncated, "vocab": len(tok)}


def run_build(ctx: Context, out: Path) -> dict:
    cfg = ctx.config
    tok_dir = ctx.output("tokenize") / "tokenizer"
    vocab = ctx.manifest("tokenize")["vocab"]
    if cfg.model.arch is None:
        path = config_lib.checkpoint_path(cfg.model)
        ckpt = Checkpoint(path)
        family = models.family_of(ckpt.config, str(path / "config.json"))
        if ckpt.config["vocab_size"] < vocab:
            raise ValueError(f"{path}/config.json: vocab_size {ckpt.config['vocab_size']} < tokenizer size {vocab}")
        return {"checkpoint": str(path.resolve()), "architecture": family.architecture}
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


def built_checkpoint(ctx: Context) -> Path:
    return ctx.output("build") / ctx.manifest("build")["checkpoint"]


def run_extract(ctx: Context, out: Path) -> dict:
    cfg = ctx.config
    tokens = np.load(ctx.output("tokenize") / "tokens.npy")
    mask = np.load(ctx.output("tokenize") / "mask.npy")
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
    )
    return summary | {"layers": list(layers), "d_model": model.config.hidden_size}


def run_summarize(ctx: Context, out: Path) -> dict:
    layers = ctx.manifest("extract")["layers"]
    stats = {}
    for layer in layers:
        files = sorted((ctx.output("extract") / f"layer{layer}").glob("*.npy"))
        stats[layer] = extract.summarize_layer(files)
    if distributed.is_main_process():
        atomic_write_text(out / "summary.json", json.dumps(stats, indent=2) + "\n")
    lines = [f"{'layer':>5} {'tokens':>8} {'mean |h|':>10} {'p50 |h|':>10} {'p95 |h|':>10}  top outlier dims"]
    for layer, s in stats.items():
        dims = ", ".join(f"{o['dim']}:{o['mean']:+.2f}" for o in s["outlier_dims"][:3])
        lines.append(
            f"{layer:>5} {s['tokens']:>8} {s['norm']['mean']:>10.3f} {s['norm']['p50']:>10.3f} "
            f"{s['norm']['p95']:>10.3f}  {dims}"
        )
    _log.info("residual stream summary\n%s", "\n".join(lines))
    return {"layers": layers, "summary": "summary.json"}


def run_train(ctx: Context, out: Path) -> dict:
    """LoRA fine-tune the built model on train.source (else data.source); write the adapter in PEFT format."""
    cfg = ctx.config
    tok = models.load_tokenizer(ctx.output("tokenize") / "tokenizer")
    source = cfg.train.source or cfg.data.source
    # The synthetic corpus has no natural size: it takes data.num_samples unless train.num_samples is set.
    limit = cfg.train.num_samples or (cfg.data.num_samples if source == "synthetic" else None)
    chats = _chats(source, limit, cfg.seed)
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


STAGES = (
    Stage("tokenize", run_tokenize, ("seed", "data", "tokenizer", "model.checkpoint")),
    Stage("build", run_build, ("seed", "model"), inputs=("tokenize",)),
    Stage("extract", run_extract, ("model", "extract"), inputs=("tokenize", "build")),
    Stage("summarize", run_summarize, (), inputs=("extract",)),
    Stage("train", run_train, ("seed", "data", "model", "lora", "train"), inputs=("tokenize", "build")),
)
