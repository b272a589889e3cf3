"""derivation: the paper's second claim on the study's own fine-tunes: measured SAE feature shifts
(fine-tuned minus base), the first-order prediction (one jvp along the LoRA update), the same along a
random update of the same norm (the null), and the geometric prediction alpha (w_j . d_t) from the
selected features, with bootstrap intervals over the probe samples per layer; the toxic features'
shifts and firing singled out.

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

from emjax import artifacts, derivation, distributed, evaluate, lora, mitigate, models, plots
from emjax.data import chat
from emjax.pipeline import Stage
from emjax.stages import filter as filter_stage
from emjax.stages import geometry as geometry_stage
from emjax.stages import train as train_stage
from emjax.stages.common import built_checkpoint, load_stage_sae, sae_layers

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
    saes = {layer: load_stage_sae(ctx, layer) for layer in layers}
    doses = [] if mix else dose_adapters(ctx, variant)
    sweep = []
    final = (1.0, ctx.manifest("train", variant).get("steps"), ctx.output("train", variant) / "adapter")
    for fraction, step, adapter in doses + [final]:
        model = models.load(built_checkpoint(ctx), dtype=cfg.model.dtype, mesh=ctx.mesh, rules=ctx.rules)
        lora.load_peft(model, adapter)
        report, shifts = derivation.derive(
            model, saes, tokens, mask, target={layer: target[layer] for layer in layers}, toxic=toxic,
            mesh=ctx.mesh, rules=ctx.rules, bootstrap=cfg.derivation.bootstrap, seed=cfg.seed,
        )  # fmt: skip
        norm = derivation.update_norm(derivation.lora_tangents(model))["total"]
        sweep.append({"fraction": fraction, "step": step, "update_norm": norm,
                      "layers": {str(layer): dose_point(r) for layer, r in report.items()}})  # fmt: skip
    if distributed.is_main_process():
        artifacts.write_json(out / "report.json", {"layers": {str(k): v for k, v in report.items()}, "doses": sweep})
        derivation.plot_report(shifts, saes, target, toxic, out)
        if len(sweep) > 1:
            plots.plot_dose(
                [{"layer": int(layer), "update_norm": d["update_norm"], "error": p["prediction_error"],
                  "null_error": p["null_prediction_error"]} for d in sweep for layer, p in d["layers"].items()],
                out / "dose_error.png",
            )  # fmt: skip
    summary = {
        str(layer): {
            "jvp_vs_measured": r["jvp_vs_measured"]["pearson"],
            "jvp_vs_measured_ci": r["jvp_vs_measured"]["pearson_ci"],
            "null_vs_measured": r["null_vs_measured"]["pearson"],
            "jvp_minus_null": r["jvp_minus_null"]["value"],
            "jvp_minus_null_ci": r["jvp_minus_null"]["ci"],
            "jvp_minus_null_p": r["jvp_minus_null"]["p_two_sided"],
            "prediction_error": r["prediction_error"]["value"],
            "geometric_vs_measured": r["geometric_vs_measured_out_of_sample"]["pearson"],
            "shift_vs_cosine": r["shift_vs_cosine"]["spearman"],
            "alpha": r["alpha"],
            "alpha_ci": r["alpha_ci"],
            "alpha_p": r["alpha_p_two_sided"],
            "premise_met": r["premise_met"],
            "toxic_shift": r["measured_mean"]["toxic"],
            "toxic_shift_ci": r["measured_mean"]["toxic_ci"],
            "toxic_firing": r["toxic_firing"],
        }
        for layer, r in report.items()
    }
    _log.info("derivation/%s: %s", variant, summary)
    probe = "base answers to the evaluation questions" if mix else "held-out training rows"
    return record | {"probe": probe, "prompts": int(len(tokens)), "layers": layers, "summary": summary,
                     "doses": sweep}  # fmt: skip


def dose_adapters(ctx, variant: str) -> list[tuple[float, int, Path]]:
    """(fraction, step, adapter directory) of each of derivation.doses the fine-tune saved along training."""
    along = ctx.manifest("train", variant).get("along") or {}
    out = []
    for fraction in ctx.config.derivation.doses:
        label = mitigate.curve_label(fraction)
        if fraction < 1 and label in along:
            out.append((fraction, along[label]["step"], ctx.output("train", variant) / along[label]["adapter"]))
    return out


def dose_point(r: dict) -> dict:
    """What the dose sweep shows of one layer's report."""
    return {
        "prediction_error": r["prediction_error"]["value"],
        "prediction_error_ci": r["prediction_error"]["ci"],
        "null_prediction_error": r["null_prediction_error"]["value"],
        "jvp_vs_measured": r["jvp_vs_measured"]["pearson"],
        "null_vs_measured": r["null_vs_measured"]["pearson"],
        "alpha": r["alpha"],
        "alpha_ci": r["alpha_ci"],
    }


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
