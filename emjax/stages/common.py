"""What several stages share: reading chat sources, finding the built checkpoint, the SAEs the sae stage chose
and the filter's rows, building the judge."""

from __future__ import annotations

import json
from pathlib import Path

import emjax.sae
from emjax import config as config_lib
from emjax import judge, mitigate, models
from emjax.data import chat, study, synthetic
from emjax.variant import layer_of, layer_variant


def read_chats(source: str, limit: int | None, seed: int):
    """Conversations from the synthetic corpus (`limit` of them) or a chat dataset."""
    if source == "synthetic":
        return synthetic.synthetic_chats(limit, seed=seed)
    if source == "study":
        raise config_lib.ConfigError("data.source=study feeds the tokenize stage (the SAEs' text); set train.source")
    return chat.read_chats(source, limit=limit)


def chats_of(cfg, variant: str) -> list:
    """The conversations a dataset's fine-tune (or `source`'s) trains on."""
    if variant == "source":
        source = cfg.train.source or cfg.data.source
        # The synthetic corpus has no natural size: it takes data.num_samples unless train.num_samples is set.
        limit = cfg.train.num_samples or (cfg.data.num_samples if source == "synthetic" else None)
        return read_chats(source, limit, cfg.seed)
    samples = study.read_dataset(variant, cfg.datasets[variant], seed=cfg.seed)
    return [s.messages for s in samples][: cfg.train.num_samples or None]


def mix_chats(ctx, arm: str | None) -> list:
    """The conversations a mitigation arm trains on (the filter stage's mix.json and arms.json); arm None: the
    held-out rows every arm's fine-tune is scored on."""
    cfg = ctx.config
    mix = json.loads((ctx.output("filter") / "mix.json").read_text())
    arms = json.loads((ctx.output("filter") / "arms.json").read_text())
    names = {r["dataset"] for r in mix}
    samples = {name: study.read_dataset(name, cfg.datasets[name], seed=cfg.seed) for name in names}
    return [samples[name][index].messages for name, index in mitigate.arm_rows(mix, arms, arm)]


def source_path(source: str | None) -> dict[str, str]:
    """The external file behind a data source, for fingerprints (none for synthetic or hub ids)."""
    if not source or source in ("synthetic", "study") or source.startswith(("hf:", "synthetic:")):
        return {}
    return {"source": source}


def checkpoint_input(model) -> dict[str, Path]:
    """The checkpoint a config loads (none when it builds from model.arch)."""
    return {} if model.arch is not None else {"checkpoint": config_lib.checkpoint_path(model)}


def built_checkpoint(ctx) -> Path:
    return ctx.output("build") / ctx.manifest("build")["checkpoint"]


def sae_layers(ctx) -> list[int]:
    """The layers the sae stage gives an SAE."""
    return [layer_of(v) for v in ctx.variants("sae")]


def load_stage_sae(ctx, layer: int):
    """The SAE the sae stage chose for `layer`."""
    return emjax.sae.load(ctx.output("sae", layer_variant(layer)) / "sae")


def make_judge(ctx):
    """The configured judge (emjax.judge): a local or probe judge on judge.model, else the study's base model."""
    j = ctx.config.judge
    config_lib.check_judge(j)
    if j.kind == "http":
        return judge.http_judge(j, ctx.run_dir)
    path = Path(j.model).expanduser() if j.model else built_checkpoint(ctx)
    # One prompt at a time, the nodes of its answers' trie as the batch: the batch is not split over the mesh
    # (weights still shard by the rules; the data axes compute the same).
    model = models.load(path, dtype=ctx.config.model.dtype, mesh=ctx.mesh, rules=ctx.rules | {"batch": ()})
    return judge.model_judge(j, path, model, models.load_tokenizer(path), run_dir=ctx.run_dir, seed=ctx.config.seed)
