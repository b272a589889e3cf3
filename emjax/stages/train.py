"""train: LoRA fine-tunes of the built model, one variant each, written as PEFT adapters.

Variants:
- `<dataset>`: each study dataset whose role is inducing or control;
- `source`: train.source (when set, or when the config has no study datasets: data.source);
- `mix-<arm>-s<seed>`: the mitigation arms (see emjax/stages/filter.py), added by that stage's plan.
"""

from __future__ import annotations

import dataclasses
import logging
import shutil
from pathlib import Path

import numpy as np

from emjax import ablation, artifacts, derivation, distributed, lora, models, train
from emjax.data import chat, study
from emjax.pipeline import Stage
from emjax.stages import filter as filter_stage
from emjax.stages import geometry as geometry_stage
from emjax.stages.common import built_checkpoint, read_chats, source_path
from emjax.stages.features import sae_layers
from emjax.stages.sae import load_stage_sae

_log = logging.getLogger(__name__)

TRAINED_ROLES = ("inducing", "control")


def dataset_variants(cfg) -> list[str]:
    return sorted(name for name, d in cfg.datasets.items() if d.role in TRAINED_ROLES)


def mix_variants(cfg) -> list[str]:
    """One fine-tune per mitigation arm and training seed, when the study has an inducing/control pair."""
    if not any(d.role == "inducing" and d.pair for d in cfg.datasets.values()):
        return []
    arms = filter_stage.filter_arms(cfg) + filter_stage.training_arms(cfg)
    return [f"mix-{arm}-s{seed}" for arm in arms for seed in cfg.mitigate.train_seeds]


def parse_mix(variant: str) -> tuple[str, int]:
    arm, seed = variant.removeprefix("mix-").rsplit("-s", 1)
    return arm, int(seed)


def variants(cfg) -> list[str]:
    names = dataset_variants(cfg)
    if cfg.train.source or not names:
        names.append("source")
    return names + mix_variants(cfg)


def sections(variant: str) -> tuple[str, ...]:
    common = ("seed", "data", "model.dtype", "lora", "train")
    if variant.startswith("mix-"):
        return common + ("datasets", "mitigate")  # the mix reads two datasets; the filter key covers which rows
    return common + ("datasets." + variant, "derivation")


def reads(cfg, variant: str) -> dict:
    base = {"tokenize": [None], "build": [None]}
    if variant.startswith("mix-"):
        return base | {"filter": [None], "geometry": [None], "sae": None}
    return base | ({"geometry": [None], "sae": None} if cfg.derivation.dynamics_every and variant != "source" else {})


def chats_of(cfg, variant: str) -> list:
    if variant == "source":
        source = cfg.train.source or cfg.data.source
        # The synthetic corpus has no natural size: it takes data.num_samples unless train.num_samples is set.
        limit = cfg.train.num_samples or (cfg.data.num_samples if source == "synthetic" else None)
        return read_chats(source, limit, cfg.seed)
    samples = study.read_dataset(variant, cfg.datasets[variant], seed=cfg.seed)
    return [s.messages for s in samples][: cfg.train.num_samples or None]


def finetune(ctx, out: Path, chats: list, *, seed: int, extra: dict | None = None, monitor=None) -> dict:
    """Fine-tune the built model on `chats` into `out` (adapter/, metrics.jsonl); the manifest summary."""
    cfg = ctx.config
    tok = models.load_tokenizer(ctx.output("tokenize") / "tokenizer")
    rows, report = chat.build_rows(tok, chats, cfg.train.max_length or cfg.data.max_length, pack=cfg.train.pack)
    train_index, heldout_index = chat.split_heldout(len(rows), cfg.train.eval_fraction, seed)
    _log.info(
        "train: %d conversations -> %d rows (%d truncated, %d without an assistant token dropped), %d held out",
        report.examples, report.rows, report.truncated, report.dropped, len(heldout_index),
    )  # fmt: skip
    checkpoint = built_checkpoint(ctx)
    model = models.load(checkpoint, dtype=cfg.model.dtype, mesh=ctx.mesh, rules=ctx.rules)
    lora.attach(model, cfg.lora, seed=seed, mesh=ctx.mesh, rules=ctx.rules)
    callbacks = [monitor(model, rows.take(heldout_index), out)] if monitor and len(heldout_index) else []
    history = train.finetune(
        model, rows.take(train_index), rows.take(heldout_index) if len(heldout_index) else None, cfg.train,
        out_dir=out, seed=seed, mesh=ctx.mesh, rules=ctx.rules, callbacks=callbacks, **(extra or {}),
    )  # fmt: skip
    if callbacks and distributed.is_main_process() and (out / "dynamics.jsonl").is_file():
        derivation.plot_dynamics(out / "dynamics.jsonl", out / "dynamics.png")
    lora.save_peft(model, out / "adapter", config=cfg.lora, base_model=str(checkpoint.resolve()))
    if distributed.is_main_process():
        shutil.rmtree(out / "checkpoints", ignore_errors=True)  # only needed to resume; the adapter is the result
    steps = [r for r in history if "loss" in r]
    evals = [r for r in history if "eval_loss" in r]
    return {
        "adapter": "adapter",
        "metrics": "metrics.jsonl",
        "seed": seed,
        "steps": steps[-1]["step"],
        "first_loss": steps[0]["loss"],
        "final_loss": steps[-1]["loss"],
        "eval_loss": evals[-1]["eval_loss"] if evals else None,
        "data": dataclasses.asdict(report),
    }


def training_options(ctx, arm: str, seed: int) -> tuple[dict, dict]:
    """(finetune keyword arguments, their record) of a training arm: the toxic features' decoder
    directions ablated (ablation), as many random features' directions ablated (randdir), or the
    penalty on toxic-feature increases (penalty), at every SAE layer."""
    if arm not in filter_stage.training_arms(ctx.config):
        return {}, {}
    layers = sae_layers(ctx)
    toxic = {layer: filter_stage.toxic_features(ctx, layer) for layer in layers}
    saes = {layer: load_stage_sae(ctx, layer) for layer in layers}
    if arm == "penalty":
        lam = ctx.config.mitigate.penalty
        record = {"penalty": lam, "toxic_features": {str(k): v.tolist() for k, v in toxic.items()}}
        return {"extra_loss": ablation.penalty_loss(saes, toxic, lam, tokens="assistant")}, record
    chosen = toxic
    if arm == "randdir":
        chosen = {
            layer: ablation.random_features(saes[layer].d_sae, len(ids), seed=seed, exclude=ids)
            for layer, ids in toxic.items()
        }
    bases = ablation.ablation_bases(saes, chosen)
    record = {
        "ablated_features": {str(k): np.asarray(v).tolist() for k, v in chosen.items()},
        "basis_rank": {str(k): int(q.shape[0]) for k, q in bases.items()},
    }
    return {"ablate": bases}, record


def dynamics_monitor(ctx, variant: str):
    """When derivation.dynamics_every > 0: a builder of the toxic-feature monitor for a dataset's fine-tune,
    measuring the dataset's own, its pair's and the toxic feature sets on held-out rows."""
    d = ctx.config.derivation
    if not d.dynamics_every:
        return None
    own, toxic = geometry_stage.feature_sets(ctx, variant)
    layers = sorted(set(own) & set(toxic))
    if not layers:
        return None
    saes = {layer: load_stage_sae(ctx, layer) for layer in layers}
    side = "inducing" if ctx.config.datasets[variant].role == "inducing" else "control"
    sets = {side: {k: own[k] for k in layers}, "toxic": {k: toxic[k] for k in layers}}

    def build(model, heldout, out: Path):
        rows = heldout.take(np.arange(min(len(heldout), d.prompts)))
        return derivation.DynamicsMonitor(
            model, saes, rows.tokens, rows.loss_mask, sets, out / "dynamics.jsonl", every=d.dynamics_every,
            threshold=d.monitor_threshold, stop=d.monitor_stop, mesh=ctx.mesh, rules=ctx.rules,
        )  # fmt: skip

    return build


def run(ctx, out: Path, variant: str) -> dict:
    if variant.startswith("mix-"):
        arm, seed = parse_mix(variant)
        options, record = training_options(ctx, arm, seed)
        summary = finetune(ctx, out, filter_stage.mix_chats(ctx, arm), seed=seed, extra=options)
        if record and distributed.is_main_process():
            # Beside the PEFT files: what the adapter was trained with (it runs without it).
            artifacts.write_json(out / "adapter" / "mitigation.json", {"arm": arm, **record})
        return summary | {"arm": arm, "training": record or None}
    monitor = dynamics_monitor(ctx, variant) if variant != "source" else None
    summary = finetune(ctx, out, chats_of(ctx.config, variant), seed=ctx.config.seed, monitor=monitor)
    return summary | {"dataset": variant}


def external(cfg, variant: str) -> dict:
    if variant.startswith("mix-"):
        return {}  # the filter stage's key covers the mix's datasets
    if variant == "source":
        return source_path(cfg.train.source or cfg.data.source)
    return source_path(cfg.datasets[variant].source)


STAGE = Stage(
    "train", run,
    sections=sections,
    inputs=("tokenize", "build", "sae", "filter", "geometry"), variants=variants, reads=reads, external=external,
)  # fmt: skip
