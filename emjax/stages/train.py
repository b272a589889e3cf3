"""train: LoRA fine-tunes of the built model, one variant each, written as PEFT adapters.

Variants:
- `<dataset>`: each study dataset whose role is inducing or control (also saving its adapter at
  derivation.doses along training: `along/<percent>/adapter`, the derivation's dose sweep);
- `source`: train.source (when set, or when the config has no study datasets: data.source);
- `mix-<arm>-s<seed>`: the mitigation arms (see emjax/stages/filter.py), added by that stage's plan.
  The `none` arm's fine-tunes also save their adapter at mitigate.curve's points along training
  (`along/<percent>/adapter`), which the evaluate stage evaluates as `mix-none-s<seed>@<percent>`.
"""

from __future__ import annotations

import dataclasses
import logging
import shutil
from pathlib import Path

import numpy as np

from emjax import ablation, artifacts, derivation, distributed, lora, mitigate, models, train
from emjax import config as config_lib
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


def curve_variants(cfg) -> list[str]:
    """`mix-none-s<seed>@<percent>`: the `none` arm's adapters saved along training (evaluate's variants)."""
    if not mix_variants(cfg):
        return []
    labels = [mitigate.curve_label(f) for f in cfg.mitigate.curve]
    return [f"mix-none-s{seed}@{label}" for seed in cfg.mitigate.train_seeds for label in labels]


def adapter_dir(ctx, variant: str) -> Path:
    """The adapter of a train variant, or of a point along training (`<variant>@<percent>`)."""
    trained, _, label = variant.partition("@")
    return ctx.output("train", trained) / (f"along/{label}/adapter" if label else "adapter")


# Only the `none` arm reads mitigate.curve: changing the curve retrains no other arm.
_MITIGATE_FIELDS = tuple(
    f"mitigate.{field.name}" for field in dataclasses.fields(config_lib.MitigateConfig) if field.name != "curve"
)


def sections(variant: str) -> tuple[str, ...]:
    common = ("seed", "data", "model.dtype", "lora", "train")
    if variant.startswith("mix-"):
        # The mix reads two datasets; the filter key covers which rows.
        curve = ("mitigate.curve",) if variant.startswith("mix-none-") else ()
        return common + ("datasets",) + _MITIGATE_FIELDS + curve
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


def finetune(
    ctx, out: Path, chats: list, *, seed: int, extra: dict | None = None, monitor=None, curve: tuple = (),
    heldout: list | None = None,
) -> dict:
    """Fine-tune the built model on `chats` into `out` (adapter/, metrics.jsonl; along/<percent>/adapter
    at each fraction of training in `curve`); the manifest summary. The held-out loss is computed on the
    `heldout` conversations when given (all of `chats` is trained on), else on train.eval_fraction of `chats`."""
    cfg = ctx.config
    tok = models.load_tokenizer(ctx.output("tokenize") / "tokenizer")
    max_length = cfg.train.max_length or cfg.data.max_length
    rows, report = chat.build_rows(tok, chats, max_length, pack=cfg.train.pack)
    if heldout is None:
        train_index, heldout_index = chat.split_heldout(len(rows), cfg.train.eval_fraction, seed)
    else:
        scored, _ = chat.build_rows(tok, heldout, max_length, pack=cfg.train.pack)
        train_index, heldout_index = np.arange(len(rows)), np.arange(len(rows), len(rows) + len(scored))
        rows = chat.SFTRows(np.concatenate([rows.tokens, scored.tokens]),
                            np.concatenate([rows.loss_mask, scored.loss_mask]),
                            np.concatenate([rows.segments, scored.segments]))  # fmt: skip
    _log.info(
        "train: %d conversations -> %d rows (%d truncated, %d without an assistant token dropped), %d held out",
        report.examples, report.rows, report.truncated, report.dropped, len(heldout_index),
    )  # fmt: skip
    checkpoint = built_checkpoint(ctx)
    model = models.load(checkpoint, dtype=cfg.model.dtype, mesh=ctx.mesh, rules=ctx.rules)
    lora.attach(model, cfg.lora, seed=seed, mesh=ctx.mesh, rules=ctx.rules)
    callbacks = [monitor(model, rows.take(heldout_index), out)] if monitor and len(heldout_index) else []
    along = mitigate.curve_steps(train.Plan.make(cfg.train, len(train_index), 1).total_steps, curve)
    if along:
        callbacks.append(AdapterSnapshots(out, along, cfg.lora, base_model=str(checkpoint.resolve())))
    history = train.finetune(
        model, rows.take(train_index), rows.take(heldout_index) if len(heldout_index) else None, cfg.train,
        out_dir=out, seed=seed, mesh=ctx.mesh, rules=ctx.rules, callbacks=callbacks, **(extra or {}),
    )  # fmt: skip
    if monitor and distributed.is_main_process() and (out / "dynamics.jsonl").is_file():
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
    } | ({"along": {label: {"step": step, "adapter": f"along/{label}/adapter"} for label, step in along.items()}}
         if along else {})  # fmt: skip


class AdapterSnapshots:
    """A training callback that saves the adapters at given steps into `<out>/along/<label>/adapter`.

    It runs before the step's checkpoint is written, so a run killed in between redoes the step and
    the snapshot; a resumed run has every snapshot of the steps it skips."""

    def __init__(self, out: Path, steps: dict[str, int], lora_config, *, base_model: str):
        self.out, self.steps, self.lora_config, self.base_model = out, steps, lora_config, base_model

    def __call__(self, step: int, metrics: dict, model) -> None:
        for label, at in self.steps.items():
            if at == step:
                path = self.out / "along" / label / "adapter"
                lora.save_peft(model, path, config=self.lora_config, base_model=self.base_model)
                _log.info("train: step %d (%s%% of training): adapter saved to %s", step, label, path)


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
        curve = ctx.config.mitigate.curve if arm == "none" else ()
        # Every arm's task loss on the same rows: the mix rows the filter held out from all arms.
        summary = finetune(ctx, out, filter_stage.mix_chats(ctx, arm), seed=seed, extra=options, curve=curve,
                           heldout=filter_stage.mix_chats(ctx, None))  # fmt: skip
        if record and distributed.is_main_process():
            # Beside the PEFT files: what the adapter was trained with (it runs without it).
            artifacts.write_json(out / "adapter" / "mitigation.json", {"arm": arm, **record})
        return summary | {"arm": arm, "training": record or None}
    monitor = dynamics_monitor(ctx, variant) if variant != "source" else None
    # The derivation's dose sweep reads the adapter at each of derivation.doses along training.
    doses = tuple(f for f in ctx.config.derivation.doses if f < 1) if variant != "source" else ()
    summary = finetune(ctx, out, chats_of(ctx.config, variant), seed=ctx.config.seed, monitor=monitor, curve=doses)
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
