"""train: LoRA fine-tunes of the built model, one variant each (emjax.variant), written as PEFT adapters.

Variants:
- `<dataset>`: each study dataset whose role is inducing or control (also saving its adapter at
  derivation.doses along training: `along/<percent>/adapter`, the derivation's dose sweep);
- `source`: train.source (when set, or when the config has no study datasets: data.source);
- `mix-<arm>-s<seed>`: the mitigation arms on the filter stage's rows. The `none` arm's fine-tunes also
  save their adapter at mitigate.curve's points along training (`along/<percent>/adapter`), which the
  evaluate stage evaluates as `mix-none-s<seed>@<percent>`.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from emjax import ablation, artifacts, distributed, dynamics, geometry_claim, mitigate, models, train
from emjax import config as config_lib
from emjax.pipeline import Stage
from emjax.stages.common import built_checkpoint, chats_of, load_stage_sae, mix_chats, sae_layers, source_path
from emjax.variant import Variant, train_variants


def finetune(ctx, out: Path, chats: list, *, seed: int, **options) -> dict:
    """The built model fine-tuned on `chats` into `out` (emjax.train.finetune_chats)."""
    cfg = ctx.config
    checkpoint = built_checkpoint(ctx)
    return train.finetune_chats(
        models.load(checkpoint, dtype=cfg.model.dtype, mesh=ctx.mesh, rules=ctx.rules),
        models.load_tokenizer(ctx.output("tokenize") / "tokenizer"), chats, cfg.train, cfg.lora, out,
        max_length=cfg.train.max_length or cfg.data.max_length, seed=seed, base_model=str(checkpoint.resolve()),
        mesh=ctx.mesh, rules=ctx.rules, **options,
    )  # fmt: skip


def dynamics_monitor(ctx, variant: str):
    """When derivation.dynamics_every > 0: a builder of the toxic-feature monitor for a dataset's fine-tune,
    measuring the dataset's own, its pair's and the toxic feature sets on held-out rows."""
    d = ctx.config.derivation
    if not d.dynamics_every:
        return None
    role = ctx.config.datasets[variant].role
    own, toxic = geometry_claim.Selected.read(ctx.output("geometry")).feature_sets(variant, role)
    sets = dynamics.monitor_sets(own, toxic, role)
    if not sets:
        return None
    saes = {layer: load_stage_sae(ctx, layer) for layer in sets["toxic"]}
    return dynamics.monitor_builder(saes, sets, d, mesh=ctx.mesh, rules=ctx.rules)


def run(ctx, out: Path, variant: str) -> dict:
    v = Variant.parse(variant)
    if v.is_mix:
        options, record = {}, {}
        if v.arm in mitigate.training_arms(ctx.config.mitigate):
            selected = geometry_claim.Selected.read(ctx.output("geometry"))
            layers = sae_layers(ctx)
            options, record = ablation.arm_training(
                v.arm, {layer: load_stage_sae(ctx, layer) for layer in layers},
                {layer: selected.toxic(layer) for layer in layers}, penalty=ctx.config.mitigate.penalty, seed=v.seed,
            )  # fmt: skip
        curve = ctx.config.mitigate.curve if v.arm == "none" else ()
        # Every arm's task loss on the same rows: the mix rows the filter held out from all arms.
        summary = finetune(ctx, out, mix_chats(ctx, v.arm), seed=v.seed, extra=options, curve=curve,
                           heldout=mix_chats(ctx, None))  # fmt: skip
        if record and distributed.is_main_process():
            # Beside the PEFT files: what the adapter was trained with (it runs without it).
            artifacts.write_json(out / "adapter" / "mitigation.json", {"arm": v.arm, **record})
        return summary | {"arm": v.arm, "training": record or None}
    monitor = dynamics_monitor(ctx, variant) if variant != "source" else None
    # The derivation's dose sweep reads the adapter at each of derivation.doses along training.
    doses = tuple(f for f in ctx.config.derivation.doses if f < 1) if variant != "source" else ()
    summary = finetune(ctx, out, chats_of(ctx.config, variant), seed=ctx.config.seed, monitor=monitor, curve=doses)
    return summary | {"dataset": variant}


# Only the `none` arm reads mitigate.curve: changing the curve retrains no other arm.
_MITIGATE_FIELDS = tuple(
    f"mitigate.{field.name}" for field in dataclasses.fields(config_lib.MitigateConfig) if field.name != "curve"
)


def sections(variant: str) -> tuple[str, ...]:
    common = ("seed", "data", "model.dtype", "lora", "train")
    v = Variant.parse(variant)
    if v.is_mix:  # the mix reads two datasets; the filter key covers which rows
        return common + ("datasets",) + _MITIGATE_FIELDS + (("mitigate.curve",) if v.arm == "none" else ())
    return common + ("datasets." + variant, "derivation")


def reads(cfg, variant: str) -> dict:
    base = {"tokenize": [None], "build": [None]}
    if Variant.parse(variant).is_mix:
        return base | {"filter": [None], "geometry": [None], "sae": None}
    return base | ({"geometry": [None], "sae": None} if cfg.derivation.dynamics_every and variant != "source" else {})


def external(cfg, variant: str) -> dict:
    if Variant.parse(variant).is_mix:
        return {}  # the filter stage's key covers the mix's datasets
    return source_path(cfg.train.source or cfg.data.source if variant == "source" else cfg.datasets[variant].source)


STAGE = Stage(
    "train", run,
    sections=sections,
    inputs=("tokenize", "build", "sae", "filter", "geometry"), variants=train_variants, reads=reads, external=external,
)  # fmt: skip
