"""derivation: the paper's second claim on the study's own fine-tunes: measured SAE feature shifts
(fine-tuned minus base), the first-order prediction (one jvp along the LoRA update) and the
geometric prediction alpha (w_j . d_t) from the selected features, with correlations and bootstrap
CIs per layer; the toxic features singled out.

Variants:
- `<dataset>`: each fine-tuned dataset, measured on the dataset's held-out training rows, against
  its own selected features;
- `mix-<arm>-s<seed>`: each mitigation arm's fine-tune, measured on one probe set shared by every
  arm and unseen by all of them (the base model's answers to the evaluation questions), against
  the inducing dataset's selected features: the toxic-feature shift each arm causes.

Writes `<run_dir>/derivation/<variant>/report.json` and predicted_vs_measured_L{L}.png,
shift_vs_cosine_L{L}.png per layer.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from emjax import artifacts, derivation, distributed, evaluate, lora, models
from emjax.data import chat
from emjax.pipeline import Stage
from emjax.stages import filter as filter_stage
from emjax.stages import geometry as geometry_stage
from emjax.stages import train as train_stage
from emjax.stages.common import built_checkpoint
from emjax.stages.features import sae_layers
from emjax.stages.sae import load_stage_sae

_log = logging.getLogger(__name__)


def variants(cfg) -> list[str]:
    return train_stage.dataset_variants(cfg) + train_stage.mix_variants(cfg)


def heldout_rows(ctx, variant: str) -> tuple[np.ndarray, np.ndarray]:
    """A dataset's rows its fine-tune never saw: (tokens, loss mask), at most derivation.prompts."""
    cfg = ctx.config
    tok = models.load_tokenizer(ctx.output("tokenize") / "tokenizer")
    rows, _ = chat.build_rows(tok, train_stage.chats_of(cfg, variant), cfg.train.max_length or cfg.data.max_length)
    _, heldout = chat.split_heldout(len(rows), cfg.train.eval_fraction, cfg.seed)
    heldout = heldout[: cfg.derivation.prompts]
    return rows.tokens[heldout], rows.loss_mask[heldout]


def probe_rows(ctx) -> tuple[np.ndarray, np.ndarray]:
    """The base model's answers to the evaluation questions as chats: at most derivation.prompts,
    spread over the questions (a seeded draw), the loss mask on the answers."""
    cfg = ctx.config
    answers = evaluate.read_rows(ctx.output("evaluate", "base") / "answers.csv", evaluate.ANSWERED)
    chats = [
        ([{"role": "system", "content": r["system"]}] if r.get("system") else [])
        + [{"role": "user", "content": r["question"]}, {"role": "assistant", "content": r["answer"]}]
        for r in answers
        if r["answer"].strip()
    ]
    tok = models.load_tokenizer(ctx.output("tokenize") / "tokenizer")
    rows, _ = chat.build_rows(tok, chats, cfg.train.max_length or cfg.data.max_length)
    pick = np.sort(np.random.default_rng(cfg.seed).permutation(len(rows))[: cfg.derivation.prompts])
    return rows.tokens[pick], rows.loss_mask[pick]


def run(ctx, out: Path, variant: str) -> dict:
    cfg = ctx.config
    mix = variant.startswith("mix-")
    dataset = filter_stage.inducing_pair(cfg)[0] if mix else variant
    target, toxic = geometry_stage.feature_sets(ctx, dataset)
    layers = [layer for layer in sae_layers(ctx) if target.get(layer)]
    record = {"arm": train_stage.parse_mix(variant)[0], "features_of": dataset} if mix else {"dataset": variant}
    if not layers:
        return record | {"skipped": f"no selected feature set for {dataset} (is it in a pair?)"}
    tokens, mask = probe_rows(ctx) if mix else heldout_rows(ctx, variant)
    if not len(tokens):
        return record | {"skipped": "no probe rows (the base model gave no answers)"}
    model = models.load(built_checkpoint(ctx), dtype=cfg.model.dtype, mesh=ctx.mesh, rules=ctx.rules)
    lora.load_peft(model, ctx.output("train", variant) / "adapter")
    saes = {layer: load_stage_sae(ctx, layer) for layer in layers}
    report, shifts = derivation.derive(
        model, saes, tokens, mask, target={layer: target[layer] for layer in layers}, toxic=toxic,
        mesh=ctx.mesh, rules=ctx.rules, bootstrap=cfg.derivation.bootstrap, seed=cfg.seed,
    )  # fmt: skip
    if distributed.is_main_process():
        artifacts.write_json(out / "report.json", {str(k): v for k, v in report.items()})
        derivation.plot_report(shifts, saes, target, toxic, out)
    summary = {
        str(layer): {
            "jvp_vs_measured": r["jvp_vs_measured"]["pearson"],
            "geometric_vs_measured": r["geometric_vs_measured_out_of_sample"]["pearson"],
            "shift_vs_cosine": r["shift_vs_cosine"]["spearman"],
            "toxic_shift": r["measured_mean"]["toxic"],
        }
        for layer, r in report.items()
    }
    _log.info("derivation/%s: %s", variant, summary)
    probe = "base answers to the evaluation questions" if mix else "held-out training rows"
    return record | {"probe": probe, "prompts": int(len(tokens)), "layers": layers, "summary": summary}


def sections(variant: str) -> tuple[str, ...]:
    common = ("seed", "data", "model.dtype", "train", "derivation")
    if variant.startswith("mix-"):
        return common + ("datasets", "mitigate.inducing")
    return common + (f"datasets.{variant}",)


def reads(cfg, variant: str) -> dict:
    common = {"tokenize": [None], "build": [None], "sae": None, "geometry": [None], "train": [variant]}
    return common | ({"evaluate": ["base"]} if variant.startswith("mix-") else {})


STAGE = Stage(
    "derivation", run,
    sections=sections,
    inputs=("tokenize", "build", "sae", "geometry", "train", "evaluate"),
    variants=variants,
    reads=reads,
)  # fmt: skip
