"""derivation: the paper's second claim on the study's own fine-tunes (emjax.derivation): measured SAE
feature shifts against the first-order prediction, its null and the geometric fit alpha, per layer.

Variants:
- `<dataset>`: each fine-tuned dataset, measured on the dataset's held-out training rows, against
  its own selected features, at each of derivation.doses of training and at its end (the dose
  sweep: how the prediction error grows with the update);
- `mix-<arm>-s<seed>`: each mitigation arm's fine-tune, measured on one probe set shared by every
  arm and unseen by all of them (the base model's answers to the evaluation questions), against
  the inducing dataset's selected features: the toxic-feature shift each arm causes.

Writes `<run_dir>/derivation/<variant>/report.json` ({"layers": the final adapter's layer reports,
"doses": per fraction of training, the update norm and each layer's prediction errors and r}),
predicted_vs_measured_L{L}.png, shift_vs_cosine_L{L}.png per layer and dose_error.png.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from emjax import derivation, distributed, evaluate, geometry_claim, lora, mitigate, models, prompts, train
from emjax.data import chat
from emjax.pipeline import Stage
from emjax.stages.common import built_checkpoint, chats_of, load_stage_sae, sae_layers
from emjax.variant import Variant, dataset_variants, mix_variants

_log = logging.getLogger(__name__)


def heldout_rows(ctx, variant: str) -> tuple[np.ndarray, np.ndarray]:
    """A dataset's rows its fine-tune never saw: (tokens, loss mask), at most derivation.prompts."""
    cfg = ctx.config
    tok = models.load_tokenizer(ctx.output("tokenize") / "tokenizer")
    rows, _ = chat.build_rows(tok, chats_of(cfg, variant), cfg.train.max_length or cfg.data.max_length)
    _, heldout = chat.split_heldout(len(rows), cfg.train.eval_fraction, cfg.seed)
    heldout = heldout[: cfg.derivation.prompts]
    return rows.tokens[heldout], rows.loss_mask[heldout]


def probe_rows(ctx) -> tuple[np.ndarray, np.ndarray]:
    """The base model's answers to the evaluation questions as chats: at most derivation.prompts,
    spread over the questions (a seeded draw), the loss mask on the answers."""
    cfg = ctx.config
    answers = evaluate.read_rows(ctx.output("evaluate", "base") / "answers.csv", evaluate.ANSWERED)
    chats = [prompts.messages_for(r["question"], r.get("system")) + [{"role": "assistant", "content": r["answer"]}]
             for r in answers if r["answer"].strip()]  # fmt: skip
    tok = models.load_tokenizer(ctx.output("tokenize") / "tokenizer")
    rows, _ = chat.build_rows(tok, chats, cfg.train.max_length or cfg.data.max_length)
    pick = np.sort(np.random.default_rng(cfg.seed).permutation(len(rows))[: cfg.derivation.prompts])
    return rows.tokens[pick], rows.loss_mask[pick]


def run(ctx, out: Path, variant: str) -> dict:
    cfg = ctx.config
    v = Variant.parse(variant)
    mix = v.is_mix
    dataset = mitigate.inducing_pair(cfg)[0] if mix else variant
    selected = geometry_claim.Selected.read(ctx.output("geometry"))
    target, toxic = selected.feature_sets(dataset, cfg.datasets[dataset].role)
    layers = [layer for layer in sae_layers(ctx) if target.get(layer)]
    record = {"arm": v.arm, "features_of": dataset} if mix else {"dataset": variant}
    if not layers:
        return record | {"skipped": f"no selected feature set for {dataset} (is it in a pair?)"}
    tokens, mask = probe_rows(ctx) if mix else heldout_rows(ctx, variant)
    if not len(tokens):
        return record | {"skipped": "no probe rows (the base model gave no answers)"}
    saes = {layer: load_stage_sae(ctx, layer) for layer in layers}
    doses = [] if mix else dose_adapters(ctx, variant)
    final = (1.0, ctx.manifest("train", variant).get("steps"), ctx.output("train", variant) / "adapter")

    def load(adapter: Path):
        model = models.load(built_checkpoint(ctx), dtype=cfg.model.dtype, mesh=ctx.mesh, rules=ctx.rules)
        lora.load_peft(model, adapter)
        return model

    target = {layer: target[layer] for layer in layers}
    report, shifts, sweep = derivation.dose_sweep(load, doses + [final], saes, tokens, mask, target=target,
                                                  toxic=toxic, bootstrap=cfg.derivation.bootstrap, seed=cfg.seed,
                                                  mesh=ctx.mesh, rules=ctx.rules)  # fmt: skip
    if distributed.is_main_process():
        derivation.write(out, report, shifts, sweep, saes, target, toxic)
    summary = {str(layer): derivation.layer_summary(r) for layer, r in report.items()}
    _log.info("derivation/%s: %s", variant, summary)
    probe = "base answers to the evaluation questions" if mix else "held-out training rows"
    return record | {"probe": probe, "prompts": int(len(tokens)), "layers": layers, "summary": summary,
                     "doses": sweep}  # fmt: skip


def dose_adapters(ctx, variant: str) -> list[tuple[float, int, Path]]:
    """(fraction, step, adapter directory) of each of derivation.doses the fine-tune saved along training."""
    along = ctx.manifest("train", variant).get("along") or {}
    out = []
    for fraction in ctx.config.derivation.doses:
        label = train.curve_label(fraction)
        if fraction < 1 and label in along:
            out.append((fraction, along[label]["step"], ctx.output("train", variant) / along[label]["adapter"]))
    return out


def sections(variant: str) -> tuple[str, ...]:
    common = ("seed", "data", "model.dtype", "train", "derivation")
    if Variant.parse(variant).is_mix:
        return common + ("datasets", "mitigate.inducing")
    return common + (f"datasets.{variant}",)


def reads(cfg, variant: str) -> dict:
    common = {"tokenize": [None], "build": [None], "sae": None, "geometry": [None], "train": [variant]}
    return common | ({"evaluate": ["base"]} if Variant.parse(variant).is_mix else {})


STAGE = Stage(
    "derivation", run,
    sections=sections,
    inputs=("tokenize", "build", "sae", "geometry", "train", "evaluate"),
    variants=lambda cfg: dataset_variants(cfg) + mix_variants(cfg),
    reads=reads,
)  # fmt: skip
