"""derivation: the paper's second claim on the study's own fine-tunes, one variant per fine-tuned
dataset: measured SAE feature shifts (fine-tuned minus base, on the dataset's held-out training
rows), the first-order prediction (one jvp along the LoRA update) and the geometric prediction
alpha (w_j . d_t) from the dataset's selected features, with correlations and bootstrap CIs per
layer; the toxic features singled out.

Writes `<run_dir>/derivation/<dataset>/report.json` and predicted_vs_measured_L{L}.png,
shift_vs_cosine_L{L}.png per layer.
"""

from __future__ import annotations

import logging
from pathlib import Path

from emjax import artifacts, derivation, distributed, lora, models
from emjax.data import chat
from emjax.pipeline import Stage
from emjax.stages import geometry as geometry_stage
from emjax.stages import train as train_stage
from emjax.stages.common import built_checkpoint
from emjax.stages.features import sae_layers
from emjax.stages.sae import load_stage_sae

_log = logging.getLogger(__name__)


def run(ctx, out: Path, variant: str) -> dict:
    cfg = ctx.config
    target, toxic = geometry_stage.feature_sets(ctx, variant)
    layers = [layer for layer in sae_layers(ctx) if target.get(layer)]
    if not layers:
        return {"dataset": variant, "skipped": "no selected feature set for this dataset (is it in a pair?)"}
    tok = models.load_tokenizer(ctx.output("tokenize") / "tokenizer")
    chats = train_stage.chats_of(cfg, variant)
    rows, _ = chat.build_rows(tok, chats, cfg.train.max_length or cfg.data.max_length)
    _, heldout = chat.split_heldout(len(rows), cfg.train.eval_fraction, cfg.seed)  # rows the fine-tune never saw
    heldout = heldout[: cfg.derivation.prompts]
    tokens, mask = rows.tokens[heldout], rows.loss_mask[heldout]
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
    return {"dataset": variant, "prompts": int(len(heldout)), "layers": layers, "summary": summary}


STAGE = Stage(
    "derivation", run,
    sections=lambda variant: ("seed", "data", "model.dtype", "train", "derivation", f"datasets.{variant}"),
    inputs=("tokenize", "build", "sae", "geometry", "train"),
    variants=train_stage.dataset_variants,
    reads=lambda cfg, variant: {"tokenize": [None], "build": [None], "sae": None, "geometry": [None],
                                "train": [variant]},
)  # fmt: skip
