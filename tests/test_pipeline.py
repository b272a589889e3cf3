"""The embedded tiny pipeline end to end: artifacts, skipping, resuming."""

import dataclasses
import json
import os
import shutil
import subprocess
import sys

import jax.numpy as jnp
import numpy as np
import pytest
import safetensors.numpy

import emjax.models
import emjax.sae
from emjax import artifacts, lora, pipeline, sweep
from emjax import config as config_lib
from emjax.stages import STAGES

pytestmark = pytest.mark.slow  # the tiny study end to end (a module fixture of minutes)

# 48 conversations of SAE text: far fewer tokens per latent than a real study needs (fast, not meaningful);
# two training seeds per arm, so that the margin's power and claim 3's seed-level tests are defined.
OVERRIDES = ["data.num_samples=48", "extract.rows_per_shard=16", "extract.batch_size=8", "sae.tokens_per_latent=2",
             "mitigate.train_seeds=0,1"]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("tiny")
    args = [f"--config.{o}" for o in OVERRIDES]
    result = subprocess.run(
        [sys.executable, "-m", "emjax.main", f"--run_dir={run_dir}", *args],
        capture_output=True,
        text=True,
        timeout=900,
        env=os.environ | {"XLA_FLAGS": "", "JAX_PLATFORMS": "cpu"},
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return run_dir


def strict_json(path):
    """JSON as a strict parser reads it: NaN or Infinity is an error."""

    def refuse(constant):
        raise ValueError(f"{path}: {constant} is not JSON")

    return json.loads(path.read_text(), parse_constant=refuse)


def tiny_config(run_dir):
    cfg = config_lib.apply_overrides(config_lib.load_config("tiny"), OVERRIDES)
    cfg.run_dir = str(run_dir)
    return cfg


def test_main_writes_the_run_directory(run_dir):
    saved = json.loads((run_dir / "config.json").read_text())
    assert saved["data"]["num_samples"] == 48
    for stage in ("tokenize", "build", "extract", "summarize", "sae/layer1", "train/bad_advice", "train/good_advice"):
        assert json.loads((run_dir / stage / "manifest.json").read_text())["stage"] == stage.split("/")[0]
        assert not (run_dir / f"{stage}.partial").exists()
    assert emjax.models.load_tokenizer(run_dir / "build" / "model").chat_template
    summary = json.loads((run_dir / "summarize" / "summary.json").read_text())
    assert set(summary) == {"1", "2"}


@pytest.mark.parametrize("variant", ["bad_advice", "mix-ablation-s0"])
def test_train_stage_writes_an_adapter_that_peft_loads(run_dir, variant):
    import torch
    from peft import PeftModel
    from transformers import Gemma2ForCausalLM

    manifest = json.loads((run_dir / "train" / variant / "manifest.json").read_text())
    assert manifest["final_loss"] < manifest["first_loss"] and manifest["eval_loss"] is not None
    assert not (run_dir / "train" / variant / "checkpoints").exists()
    base, adapter = run_dir / "build" / "model", run_dir / "train" / variant / "adapter"
    model = lora.load_peft(emjax.models.load(base, dtype="float32"), adapter)
    ids = np.load(run_dir / "tokenize" / "tokens.npy")[:2, :24]
    hf = PeftModel.from_pretrained(Gemma2ForCausalLM.from_pretrained(base, attn_implementation="eager"), adapter)
    with torch.no_grad():
        ref = hf.eval()(torch.as_tensor(ids.astype(np.int64))).logits.numpy()
    np.testing.assert_allclose(np.asarray(model(jnp.asarray(ids)).logits), ref, atol=1e-4 * np.abs(ref).max())


def test_extracted_activations_are_the_model_residual_stream(run_dir):
    tokens = np.load(run_dir / "tokenize" / "tokens.npy")
    mask = np.load(run_dir / "tokenize" / "mask.npy")
    model = emjax.models.load(run_dir / "build" / "model", dtype="float32")
    index = np.load(run_dir / "extract" / "index" / "00001.npy")
    acts = np.load(run_dir / "extract" / "layer2" / "00001.npy")
    rows = np.unique(index[:, 0])
    assert rows.min() == 16 and rows.max() == 31
    out = model(jnp.asarray(tokens[rows]), attention_mask=jnp.asarray(mask[rows]), capture=(2,))
    # Position 0 and BOS are left out (their residuals are attention sinks, not text).
    bos = emjax.models.load_tokenizer(run_dir / "tokenize" / "tokenizer").bos_token_id
    keep = (mask > 0) & (np.arange(tokens.shape[1]) > 0) & (tokens != bos)
    assert keep[:, 0].sum() == 0 and keep.sum() < mask.sum()
    expected = np.asarray(out.captured[2])[keep[rows]]
    np.testing.assert_allclose(acts, expected, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(index, np.argwhere(keep[16:32]) + [16, 0])
    # Summary statistics against numpy on all shards.
    everything = np.concatenate([np.load(f) for f in sorted((run_dir / "extract" / "layer2").glob("*.npy"))])
    assert len(everything) == keep.sum()
    summary = json.loads((run_dir / "summarize" / "summary.json").read_text())["2"]
    assert summary["tokens"] == len(everything)
    np.testing.assert_allclose(summary["norm"]["mean"], np.linalg.norm(everything, axis=1).mean(), rtol=1e-6)
    np.testing.assert_allclose(summary["mean_variance"], everything.astype(np.float64).var(0).mean(), rtol=1e-6)


def test_rerun_skips_finished_stages(run_dir):
    before = {s: (run_dir / s / "manifest.json").stat().st_mtime_ns for s in ("tokenize", "build", "extract")}
    pipeline.run(tiny_config(run_dir), STAGES)
    after = {s: (run_dir / s / "manifest.json").stat().st_mtime_ns for s in before}
    assert before == after


def test_killed_extraction_resumes_and_gives_the_same_result(run_dir, tmp_path):
    copy = tmp_path / "run"
    shutil.copytree(run_dir, copy)
    cfg = tiny_config(copy)
    key = json.loads((copy / "extract" / "manifest.json").read_text())["key"]
    reference = (copy / "summarize" / "summary.json").read_text()
    # What a kill after two of three shards leaves behind.
    partial = copy / "extract.partial"
    os.replace(copy / "extract", partial)
    (partial / "manifest.json").unlink()
    (partial / ".key").write_text(key)
    (partial / "index" / "00002.npy").unlink()
    (partial / "layer1" / "00002.npy").unlink()
    pipeline.run(cfg, STAGES)
    manifest = json.loads((copy / "extract" / "manifest.json").read_text())
    assert manifest["resumed_shards"] == 2 and manifest["shards"] == 3
    # The copy is self-contained: its stages point inside it, not at the original run.
    assert json.loads((copy / "build" / "manifest.json").read_text())["checkpoint"] == "model"
    assert (copy / "summarize" / "summary.json").read_text() == reference


def test_changed_config_reruns_the_stage_and_those_after(run_dir, tmp_path):
    copy = tmp_path / "run"
    shutil.copytree(run_dir, copy)
    cfg = tiny_config(copy)
    cfg.extract.layers = (0,)
    tokenize_before = (copy / "tokenize" / "manifest.json").stat().st_mtime_ns
    pipeline.run(cfg, STAGES, ["tokenize", "build", "extract", "summarize"])
    assert json.loads((copy / "extract" / "manifest.json").read_text())["layers"] == [0]
    assert set(json.loads((copy / "summarize" / "summary.json").read_text())) == {"0"}
    assert (copy / "tokenize" / "manifest.json").stat().st_mtime_ns == tokenize_before
    # The SAEs read extract's activations, which no longer hold their layers: a clear error.
    with pytest.raises(config_lib.ConfigError, match="sae.layers has 1, but extract wrote no activations"):
        pipeline.run(cfg, STAGES, ["sae"])


def test_too_few_tokens_for_the_sae_is_a_config_error_naming_the_fields(run_dir, tmp_path):
    copy = tmp_path / "run"
    shutil.copytree(run_dir, copy)
    cfg = tiny_config(copy)
    cfg.sae.tokens_per_latent = 10**6
    with pytest.raises(config_lib.ConfigError, match="sae layer 1: .* raise data.num_samples or data.max_length"):
        pipeline.run(cfg, STAGES, ["sae"])


def test_a_stage_without_its_inputs_says_which(tmp_path):
    with pytest.raises(
        pipeline.MissingInputError, match="output of stage 'tokenize' is not at .*add 'tokenize' to --stages"
    ):
        pipeline.run(tiny_config(tmp_path), STAGES, ["build"])


def test_a_checkpoint_named_by_an_environment_variable(run_dir, tmp_path, monkeypatch):
    # The tiny run's saved model stands in for a real checkpoint directory (weights + tokenizer).
    checkpoint = tmp_path / "checkpoint"
    shutil.copytree(run_dir / "build" / "model", checkpoint)
    monkeypatch.setenv("EMJAX_TEST_CHECKPOINT", str(checkpoint))
    cfg = tiny_config(tmp_path / "run")
    cfg.model = dataclasses.replace(cfg.model, arch=None, checkpoint_env="EMJAX_TEST_CHECKPOINT")
    cfg.tokenizer = dataclasses.replace(cfg.tokenizer, train=False)
    stages = ["tokenize", "build", "extract", "summarize"]
    pipeline.run(cfg, STAGES, stages)
    run = tmp_path / "run"
    assert json.loads((run / "build" / "manifest.json").read_text())["checkpoint"] == str(checkpoint.resolve())
    np.testing.assert_array_equal(
        np.load(run / "tokenize" / "tokens.npy"), np.load(run_dir / "tokenize" / "tokens.npy")
    )
    summary = json.loads((run / "summarize" / "summary.json").read_text())
    reference = json.loads((run_dir / "summarize" / "summary.json").read_text())
    np.testing.assert_allclose(summary["2"]["norm"]["mean"], reference["2"]["norm"]["mean"], rtol=1e-6)
    # Pointing the variable at another checkpoint redoes the stages that read it.
    moved = tmp_path / "moved"
    os.replace(checkpoint, moved)
    monkeypatch.setenv("EMJAX_TEST_CHECKPOINT", str(moved))
    pipeline.run(cfg, STAGES, stages)
    assert json.loads((run / "build" / "manifest.json").read_text())["checkpoint"] == str(moved.resolve())
    # New weights at the same path (same size, same names): the stages that read them run again.
    key = json.loads((run / "extract" / "manifest.json").read_text())["key"]
    weights = safetensors.numpy.load_file(str(moved / "model.safetensors"))
    artifacts.write_safetensors(moved / "model.safetensors", {k: v * 0.5 for k, v in weights.items()})
    pipeline.run(cfg, STAGES, stages)
    assert json.loads((run / "extract" / "manifest.json").read_text())["key"] != key


def test_extract_layers_out_of_range_name_the_key(run_dir, tmp_path):
    copy = tmp_path / "run"
    shutil.copytree(run_dir, copy)
    cfg = tiny_config(copy)
    cfg.extract.layers = (4,)
    with pytest.raises(config_lib.ConfigError, match=r"extract.layers=\(4,\): each layer must be in 0..3"):
        pipeline.run(cfg, STAGES, ["extract"])


ARMS = ["none", "geometry-residual_cosine", "random-0", "judge", "ablation", "randdir", "penalty"]
MIXED = [f"mix-{arm}-s{seed}" for arm in ARMS for seed in (0, 1)]  # two training seeds per arm
STUDY = {
    "sae": ["layer1", "layer2"],
    "features": ["aligned_answers", "bad_advice", "good_advice", "misaligned_answers"],
    "train": ["bad_advice", "good_advice", *MIXED],
    "derivation": ["bad_advice", "good_advice", *MIXED],
    "evaluate": ["mix-none-s0@50", "mix-none-s1@50"],
}  # fmt: skip


def test_the_whole_study_runs_and_reports(run_dir):
    for stage, variants in STUDY.items():
        for variant in variants:
            assert json.loads((run_dir / stage / variant / "manifest.json").read_text())["variant"] == variant
    for variant in ["base"] + STUDY["train"]:
        summary = json.loads((run_dir / "evaluate" / variant / "summary.json").read_text())
        assert summary["overall"]["n"] == 4 * 4  # 4 synthetic questions x 4 samples
    report = json.loads((run_dir / "report" / "report.json").read_text())
    assert {"sae", "geometry", "derivation", "evaluation", "mitigation"} <= set(report)
    assert set(report["mitigation"]["arms"]) == set(ARMS)
    text = (run_dir / "report" / "report.md").read_text()
    assert "## Geometry" in text and "## Mitigation" in text and ".png)" in text
    # The geometry filter removed half of the pool (the mix less its held-out rows), and the record says how many
    # were inducing.
    arms = json.loads((run_dir / "filter" / "arms.json").read_text())
    pool = sum(not r["heldout"] for r in json.loads((run_dir / "filter" / "mix.json").read_text()))
    assert len(arms["geometry-residual_cosine"]["removed"]) == pool // 2 == len(arms["random-0"]["removed"])
    # The ablation arm records what it projected out, beside a PEFT adapter.
    recorded = json.loads((run_dir / "train" / "mix-ablation-s0" / "adapter" / "mitigation.json").read_text())
    assert recorded["arm"] == "ablation" and set(recorded["ablated_features"]) == {"1", "2"}
    # Every arm's toxic-feature shift comes from its derivation, on one probe set: the base model's answers.
    comparison = json.loads((run_dir / "mitigate" / "comparison.json").read_text())
    for arm, result in comparison["arms"].items():
        derived = [json.loads((run_dir / "derivation" / f"mix-{arm}-s{seed}" / "manifest.json").read_text())
                   for seed in (0, 1)]  # fmt: skip
        assert all(d["probe"].startswith("base answers") and d["features_of"] == "bad_advice" for d in derived)
        assert {k: v["seeds"] for k, v in result["toxic_shift"].items()} == {
            k: [d["summary"][k]["toxic_shift"] for d in derived] for k in derived[0]["summary"]
        }
    curve = comparison["none_over_training"]
    assert [p["fraction"] for p in curve] == [0.5, 1.0] and curve[0]["steps"][0] < curve[1]["steps"][0]
    assert "along training" in text
    # Claims 1 and 2: every test two-sided and Holm-adjusted in one family, the verdicts in the report's words.
    geometry = strict_json(run_dir / "geometry" / "report.json")
    family = geometry["family"]
    assert family["size"] == len(family["tests"]) >= 2 * 2 * 3 * 6 and family["method"] == "holm"
    assert all(t["p_holm"] is None or t["p_holm"] >= t["p_two_sided"] for t in family["tests"])
    for row in json.loads((run_dir / "geometry" / "manifest.json").read_text())["table"]:
        assert row["verdict"].startswith(("supported", "not supported")) and row["p_holm"] >= row["p"]
    assert geometry["toxic_sets"]["misaligned_answers"]["left_out_models"] == ["tuned-bad_advice"]
    derivation = strict_json(run_dir / "derivation" / "bad_advice" / "report.json")
    assert [d["fraction"] for d in derivation["doses"]] == [0.34, 0.67, 1.0]
    norms = [d["update_norm"] for d in derivation["doses"]]
    assert norms[0] < norms[-1]
    layer = derivation["layers"]["1"]
    assert {"alpha_ci", "premise_met", "null_vs_measured", "toxic_firing"} <= set(layer)
    assert "## Claims" in text and "Claim 1" in text and "Claim 2" in text and "Dose sweep" in text


def test_every_json_the_study_writes_is_strict_and_undefined_rates_are_null(run_dir):
    def refuse(constant):
        raise ValueError(f"not JSON: {constant}")

    files = sorted(run_dir.rglob("*.json"))
    assert len(files) > 50
    for path in files:
        try:
            json.loads(path.read_text(), parse_constant=refuse)
        except ValueError as e:
            raise AssertionError(f"{path.relative_to(run_dir)}: {e}") from None
    for path in run_dir.rglob("*.jsonl"):  # training metrics, one JSON object a line
        for line in path.read_text().splitlines():
            json.loads(line, parse_constant=refuse)
    # The tiny judge scores nothing: no rate, in either convention, is a number; every rate table has `scored`.
    report_json = json.loads((run_dir / "report" / "report.json").read_text())
    for name, summary in report_json["evaluation"].items():
        for overall in (summary["overall"], summary["model_organisms"]["overall"]):
            if overall["scored"] == 0:
                assert overall["rate"] is None and overall["rate_all"] is None, name
    for arm in report_json["mitigation"]["arms"].values():
        assert "scored" in arm and "rate" in arm["model_organisms"]
    text = (run_dir / "report" / "report.md").read_text()
    tables = [block for block in text.split("\n\n") if block.startswith("|") and "rate |" in block]
    assert len(tables) >= 3 and all("| scored |" in t for t in tables)
    assert "| nan |" not in text and "| None |" not in text


def test_the_none_arm_saves_its_adapter_along_training(run_dir):
    """The adapter saved at step s is the trainer's state after s steps: with it, transformers + peft give
    on step s+1's batch the loss the trainer logged for step s+1."""
    import torch
    from peft import PeftModel
    from transformers import Gemma2ForCausalLM

    from emjax import train
    from emjax.data import chat
    from emjax.stages.common import mix_chats

    cfg = tiny_config(run_dir)
    out = run_dir / "train" / "mix-none-s0"
    manifest = json.loads((out / "manifest.json").read_text())
    step = manifest["along"]["50"]["step"]
    assert step == round(0.5 * manifest["steps"])
    tok = emjax.models.load_tokenizer(run_dir / "tokenize" / "tokenizer")
    chats = mix_chats(pipeline.Context(cfg, STAGES), "none")  # the arm trains on all its rows
    rows, _ = chat.build_rows(tok, chats, cfg.train.max_length or cfg.data.max_length)
    batch = train.Plan.make(cfg.train, len(rows), 1).batch_indices(step, 0, cfg.train.batch_size)
    tokens, mask = rows.tokens[batch[batch >= 0]], rows.loss_mask[batch[batch >= 0]]
    base = run_dir / "build" / "model"
    hf = PeftModel.from_pretrained(
        Gemma2ForCausalLM.from_pretrained(base, attn_implementation="eager"), out / "along" / "50" / "adapter"
    )
    with torch.no_grad():
        logits = hf.eval()(torch.as_tensor(tokens.astype(np.int64))).logits.double()
    nll = -torch.log_softmax(logits[:, :-1], -1).gather(-1, torch.as_tensor(tokens[:, 1:, None].astype(np.int64)))[
        ..., 0
    ]
    weights = torch.as_tensor(mask[:, 1:].astype(np.float64))
    logged = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    loss = next(r["loss"] for r in logged if r["step"] == step + 1 and "loss" in r)
    assert float((nll * weights).sum() / weights.sum()) == pytest.approx(loss, rel=1e-4)


def test_feature_statistics_count_the_assistant_tokens(run_dir):
    from emjax.data import chat, study
    from emjax.feature_stats import load_samples, load_stats

    cfg = tiny_config(run_dir)
    tok = emjax.models.load_tokenizer(run_dir / "tokenize" / "tokenizer")
    samples = study.read_dataset("misaligned_answers", cfg.datasets["misaligned_answers"], seed=cfg.seed)
    counted = sum(int(chat.encode(tok, s.messages)[1][: cfg.data.max_length].sum()) for s in samples)
    assert load_stats(run_dir / "features" / "misaligned_answers", 1).tokens == counted
    codes, residuals, tokens = load_samples(run_dir / "features" / "misaligned_answers", 1)
    assert residuals.shape == (len(samples), 64) and tokens.sum() == counted


def test_changing_one_dataset_reruns_only_its_variants(run_dir, tmp_path):
    copy = tmp_path / "run"
    shutil.copytree(run_dir, copy)
    cfg = tiny_config(copy)
    cfg.datasets["aligned_answers"] = dataclasses.replace(cfg.datasets["aligned_answers"], limit=20)
    before = {v: (copy / "features" / v / "manifest.json").stat().st_mtime_ns for v in STUDY["features"]}
    pipeline.run(cfg, STAGES, ["features"])
    after = {v: (copy / "features" / v / "manifest.json").stat().st_mtime_ns for v in STUDY["features"]}
    assert [v for v in before if before[v] != after[v]] == ["aligned_answers"]
    assert json.loads((copy / "features" / "aligned_answers" / "manifest.json").read_text())["samples"] == 20


def test_a_skipped_invocation_leaves_config_json_alone(run_dir):
    before = (run_dir / "config.json").read_text()
    args = [f"--config.{o}" for o in OVERRIDES] + ["--config.name=renamed"]  # no stage reads the name
    result = subprocess.run(
        [sys.executable, "-m", "emjax.main", f"--run_dir={run_dir}", *args],
        capture_output=True, text=True, timeout=600, env=os.environ | {"XLA_FLAGS": "", "JAX_PLATFORMS": "cpu"},
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-2000:]
    assert "up to date" in result.stderr and "running into" not in result.stderr
    assert (run_dir / "config.json").read_text() == before


def test_the_sweep_collects_runs(run_dir, tmp_path):
    rows = sweep.write([run_dir, run_dir], tmp_path / "sweep")
    assert (
        len(rows) == 2
        and rows[0]["parameters"] == json.loads((run_dir / "build" / "manifest.json").read_text())["parameters"]
    )
    table = (tmp_path / "sweep" / "sweep.md").read_text()
    assert "geometry_effect" in table and "jvp_correlation" in table


def test_serve_takes_a_configs_model(run_dir, tmp_path):
    from emjax import serve

    assert serve.config_model("tiny", str(run_dir)) == run_dir / "build" / "model"
    with pytest.raises(config_lib.ConfigError, match="builds its model in a run"):
        serve.config_model("tiny", str(tmp_path))


def test_damaged_outputs_of_the_study_are_redone_before_they_are_read(run_dir, tmp_path):
    import csv

    copy = tmp_path / "run"
    shutil.copytree(run_dir, copy)  # mtimes kept: nothing is hashed again
    cfg = tiny_config(copy)
    scores = copy / "evaluate" / "mix-none-s0" / "scores.csv"
    with open(scores, newline="") as f:
        rows = list(csv.DictReader(f))
    with open(scores, "w", newline="") as f:  # the `coherent` column dropped
        writer = csv.DictWriter(f, [c for c in rows[0] if c != "coherent"], extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    with pytest.raises(pipeline.DamagedOutputError, match=f"{scores} changed size .*add 'evaluate' to --stages"):
        pipeline.run(cfg, STAGES, ["mitigate"])
    pipeline.run(cfg, STAGES, ["evaluate", "mitigate"])
    with open(scores, newline="") as f:
        redone = list(csv.DictReader(f))
    assert [(r["aligned"], r["coherent"]) for r in redone] == [(r["aligned"], r["coherent"]) for r in rows]
    before = json.loads((run_dir / "mitigate" / "comparison.json").read_text())["arms"]["none"]
    after = json.loads((copy / "mitigate" / "comparison.json").read_text())["arms"]["none"]
    keys = ("answers", "coherent", "rate")
    assert [after[k] for k in keys] == [before[k] for k in keys]
    # The run's own SAE weights cut in half: redone, not "up to date".
    weights = copy / "sae" / "layer1" / "sae" / "sae_weights.safetensors"
    size = weights.stat().st_size
    os.truncate(weights, size // 2)
    pipeline.run(cfg, STAGES, ["sae"])
    assert weights.stat().st_size == size
    emjax.sae.load(weights.parent)


def _peft_model(run_dir, variant):
    from peft import PeftModel
    from transformers import Gemma2ForCausalLM

    base = Gemma2ForCausalLM.from_pretrained(run_dir / "build" / "model", attn_implementation="eager")
    return base.eval() if variant == "base" else PeftModel.from_pretrained(
        base, run_dir / "train" / variant / "adapter").eval()  # fmt: skip


def test_every_arm_is_scored_on_one_shared_set_of_heldout_rows(run_dir):
    """No arm trains on the held-out mix rows, and each fine-tune's eval_loss is transformers + peft's loss on
    exactly those rows."""
    import torch

    from emjax.data import chat
    from emjax.stages.common import mix_chats

    mix = json.loads((run_dir / "filter" / "mix.json").read_text())
    heldout = {i for i, r in enumerate(mix) if r["heldout"]}
    assert len(heldout) == round(0.1 * len(mix))
    for arm in json.loads((run_dir / "filter" / "arms.json").read_text()).values():
        assert not heldout & set(arm["kept"]) and not heldout & set(arm["removed"])
    cfg = tiny_config(run_dir)
    tok = emjax.models.load_tokenizer(run_dir / "tokenize" / "tokenizer")
    rows, _ = chat.build_rows(tok, mix_chats(pipeline.Context(cfg, STAGES), None), cfg.data.max_length)
    tokens = torch.as_tensor(rows.tokens.astype(np.int64))
    weights = torch.as_tensor(rows.loss_mask[:, 1:].astype(np.float64))
    for variant in ("mix-none-s1", "mix-geometry-residual_cosine-s0", "mix-ablation-s0"):
        with torch.no_grad():
            logits = _peft_model(run_dir, variant)(tokens).logits.double()
        nll = -torch.log_softmax(logits[:, :-1], -1).gather(-1, tokens[:, 1:, None])[..., 0]
        expected = float((nll * weights).sum() / weights.sum())
        manifest = json.loads((run_dir / "train" / variant / "manifest.json").read_text())
        assert manifest["eval_loss"] == pytest.approx(expected, rel=1e-4)


def test_margins_power_and_claim3_against_independent_computations(run_dir):
    """The margin of a fine-tune recomputed with transformers + peft on a few pairs; each arm's margin from its
    seeds; power against statsmodels; the variant-minus-base interval against scipy's paired t."""
    import scipy.stats
    import torch
    from statsmodels.stats.power import TTestIndPower

    from emjax.data import style_matched

    cfg = tiny_config(run_dir)
    pairs = style_matched.margin_pairs(cfg)
    tok = emjax.models.load_tokenizer(run_dir / "tokenize" / "tokenizer")
    per_pair = strict_json(run_dir / "evaluate" / "mix-none-s0" / "margin.json")["per_pair"]
    assert len(per_pair["margin"]) == len(pairs) and per_pair["model"] == [p.model for p in pairs]
    model = _peft_model(run_dir, "mix-none-s0")
    for i in (0, len(pairs) // 2, len(pairs) - 1):
        means = []
        for answer in pairs[i][1:3]:
            messages = [{"role": "user", "content": pairs[i].question}, {"role": "assistant", "content": answer}]
            prompt = tok.apply_chat_template(messages[:1], tokenize=False, add_generation_prompt=True)
            ids = tok(tok.apply_chat_template(messages, tokenize=False), add_special_tokens=False)["input_ids"]
            ids = ids[: cfg.evaluate.margin_max_length]
            start = len(tok(prompt, add_special_tokens=False)["input_ids"])
            with torch.no_grad():
                logp = torch.log_softmax(model(torch.tensor([ids])).logits[0].double(), -1).numpy()
            targets = np.arange(start, len(ids))
            means.append(logp[targets - 1, np.asarray(ids)[targets]].mean())
        assert per_pair["margin"][i] == pytest.approx(means[0] - means[1], rel=1e-3, abs=1e-4)
    report_json = strict_json(run_dir / "report" / "report.json")
    comparison = strict_json(run_dir / "mitigate" / "comparison.json")
    for arm, result in comparison["arms"].items():
        seeds = [strict_json(run_dir / "evaluate" / f"mix-{arm}-s{s}" / "summary.json")["margin"]["mean"]
                 for s in (0, 1)]  # fmt: skip
        assert result["margin"]["per_seed"] == seeds and result["margin"]["seeds"] == [0, 1]
        assert result["margin"]["mean"] == pytest.approx(np.mean(seeds), rel=1e-9)
        assert result["margin"]["ci"] == pytest.approx(list(scipy.stats.ttest_1samp(seeds, 0).confidence_interval()),
                                                       rel=1e-6)  # fmt: skip
    none = comparison["arms"]["none"]["margin"]["per_seed"]
    power = comparison["power"]
    assert power["sigma_seed"] == pytest.approx(np.std(none, ddof=1), rel=1e-9) and power["seeds"] == 2
    d = TTestIndPower().solve_power(nobs1=2, alpha=0.05, power=0.8, ratio=1.0, alternative="two-sided")
    assert power["mde"] == pytest.approx(d * power["sigma_seed"], rel=1e-4)
    assert report_json["mitigation"]["power"] == power
    # Claim 3: the geometry arm against none over seeds (Student's t), with the report's wording.
    geometry = [t for t in comparison["claim3"]["tests"] if t["endpoint"] == "margin" and t["reference"] == "none"][0]
    geo = comparison["arms"]["geometry-residual_cosine"]["margin"]["per_seed"]
    ref = scipy.stats.ttest_ind(none, geo)
    assert geometry["effect"] == pytest.approx(np.mean(none) - np.mean(geo), rel=1e-9)
    assert geometry["p_two_sided"] == pytest.approx(ref.pvalue, rel=1e-6) and geometry["p_holm"] >= ref.pvalue
    assert geometry["verdict"].startswith(("supported", "not supported"))
    # Each variant's margin minus the base model's: scipy's paired t over the pairs both define.
    base = np.asarray([np.nan if m is None else m for m in
                       strict_json(run_dir / "evaluate" / "base" / "margin.json")["per_pair"]["margin"]])  # fmt: skip
    mine = np.asarray([np.nan if m is None else m for m in per_pair["margin"]])
    both = np.isfinite(base) & np.isfinite(mine)
    minus = report_json["evaluation"]["mix-none-s0"]["margin"]["minus_base"]
    ref = scipy.stats.ttest_rel(mine[both], base[both])
    assert minus["mean"] == pytest.approx(np.mean(mine[both] - base[both]), rel=1e-9)
    assert minus["ci"] == pytest.approx(list(ref.confidence_interval()), rel=1e-6) and minus["pairs"] == both.sum()
    text = (run_dir / "report" / "report.md").read_text()
    assert "Power: `none`'s margin varies by" in text and "Margin pairs: " in text and "Claim 3" in text
    assert "minus base" in text and "margin [95% CI]" in text
