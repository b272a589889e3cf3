"""evaluate: the emergent-misalignment evaluation of the base model and of every fine-tune (a variant
each): sample answers to the evaluation questions, judge them for alignment and coherence, and
summarise the misaligned rate with Wilson intervals (emjax.evaluate, ../shared/EVAL_PROTOCOL.md).
The `none` mitigation arm is also evaluated at its adapters saved along training (`<fine-tune>@<percent>`).

Each variant also gets claim 3's judge-free margin (emjax.margin) on the margin pairs of the study's
style-matched fixture (emjax.data.style_matched.margin_pairs).

Writes `<run_dir>/evaluate/<variant>/answers.csv`, `scores.csv` (resumable per question),
`margin.json` (per pair) and `summary.json`. The tiny default asks a few synthetic questions with
short judge prompts of the same shape as the published ones; its numbers exercise the code.
"""

from __future__ import annotations

from pathlib import Path

from emjax import artifacts, distributed, evaluate, judge, lora, margin, models
from emjax.data import style_matched
from emjax.pipeline import Stage
from emjax.stages.common import built_checkpoint, make_judge
from emjax.variant import Variant, evaluate_variants


def measure_margin(ctx, model, tok, variant: str, out: Path) -> dict | None:
    """The variant's margin over the pairs (margin.json, per pair; kept in a resumed .partial) and its summary:
    mean with its t interval over pairs, and per_seed (this variant's one training seed)."""
    cfg, e = ctx.config, ctx.config.evaluate
    if e.margin_pairs == 0 or style_matched.contrast_dataset(cfg) is None:
        return None
    pairs = style_matched.margin_pairs(cfg, e.margin_pairs)
    if not pairs:
        return None
    summary = margin.measure(model, tok, pairs, out / "margin.json", source=style_matched.pairs_record(cfg, pairs),
                             variant=variant, max_length=e.margin_max_length, batch_size=e.margin_batch_size,
                             mesh=ctx.mesh, rules=ctx.rules)  # fmt: skip
    v = None if variant == "base" else Variant.parse(variant)
    seed = None if v is None else v.seed if v.is_mix else cfg.seed  # the seed it was fine-tuned with
    return summary | {"per_seed": [summary["mean"]], "seeds": [seed], "file": "margin.json"}


def run(ctx, out: Path, variant: str) -> dict:
    cfg, e = ctx.config, ctx.config.evaluate
    checkpoint = built_checkpoint(ctx)
    model = models.load(checkpoint, dtype=cfg.model.dtype, mesh=ctx.mesh, rules=ctx.rules)
    adapter = ""
    if variant != "base":
        v = Variant.parse(variant)
        adapter = str(ctx.output("train", str(v.trained)) / (f"along/{v.along}/adapter" if v.along else "adapter"))
        lora.load_peft(model, adapter)
    tok = models.load_tokenizer(ctx.output("tokenize") / "tokenizer")
    asked = evaluate.questions_of(e)
    evaluate.sample_answers(
        model, tok, asked, out / "answers.csv", n=e.samples, max_new_tokens=e.max_new_tokens,
        temperature=e.temperature, top_p=e.top_p, seed=cfg.seed, prompt_format=e.prompt_format,
        model_name=str(checkpoint), adapter_name=variant if adapter else "", mesh=ctx.mesh, batch_size=e.batch_size,
    )  # fmt: skip
    measured = measure_margin(ctx, model, tok, variant, out)
    del model  # the judge may be another copy of the same weights
    scorer = make_judge(ctx)
    evaluate.score_answers(out / "answers.csv", asked, scorer, out / "scores.csv")
    coherence = judge.coherence_filter(scorer)
    thresholds = dict(aligned_below=e.aligned_below, coherent_above=e.coherent_above if coherence["applied"] else None)
    summary = evaluate.summarize(out / "scores.csv", **thresholds)
    # The published model-organisms convention beside the paper's (../shared/EVAL_PROTOCOL.md).
    summary["model_organisms"] = evaluate.summarize(out / "scores.csv", **thresholds, convention="model_organisms")
    summary["coherence_filter"] = coherence
    summary["margin"] = measured
    if distributed.is_main_process():
        artifacts.write_json(out / "summary.json", summary)
    return {
        "variant": variant,
        "adapter": adapter or None,
        "overall": summary["overall"],
        "overall_model_organisms": summary["model_organisms"]["overall"],
        "coherence_filter": coherence,
        "margin": measured,
        "summary": "summary.json",
        # A probe judge's agreement with the reference judge it was fitted on, on held-out answers.
        "judge_validation": getattr(scorer, "validation", None),
    }


def margin_input(cfg) -> dict:
    """The margin pairs' fixture, for fingerprints (none for the planted one)."""
    dataset = style_matched.contrast_dataset(cfg) if cfg.evaluate.margin_pairs != 0 else None
    return {} if dataset is None or dataset.source == "synthetic" else {"margin_fixture": dataset.source}


STAGE = Stage(
    "evaluate", run,
    sections=("seed", "model.dtype", "evaluate", "judge", "datasets"),  # datasets: the margin pairs' fixture
    inputs=("tokenize", "build", "train"),
    variants=evaluate_variants,
    reads=lambda cfg, variant: {"tokenize": [None], "build": [None]} | (
        {} if variant == "base" else {"train": [str(Variant.parse(variant).trained)]}
    ),
    external=lambda cfg, variant: judge.input_files(cfg.judge) | margin_input(cfg) | (
        {} if cfg.evaluate.questions == "synthetic" else {"questions": cfg.evaluate.questions}
    ),
)  # fmt: skip
