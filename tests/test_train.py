"""LoRA fine-tuning: learning, frozen base weights, accumulation, sharding, resume, divergence, packing."""

import dataclasses
import json
import os
import signal

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import emjax.models
from emjax import distributed, loop, lora, train
from emjax.config import LoRAConfig, TrainConfig
from emjax.data.chat import SFTRows, epoch_order

ARCH = dict(
    model_type="llama", vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
    num_attention_heads=4, num_key_value_heads=2, head_dim=8,
)  # fmt: skip
LORA = LoRAConfig(rank=4, alpha=8)
FAST = TrainConfig(
    batch_size=8, learning_rate=3e-3, warmup_steps=2, weight_decay=0.0, checkpoint_every=0, eval_fraction=0.0
)


def task_rows(n=32, length=16, seed=0) -> SFTRows:
    """Prompts of random tokens, each answered by the same reply: learnable, and only the reply is scored."""
    rng = np.random.default_rng(seed)
    half = length // 2
    prompt = rng.integers(2, 64, (n, half))
    reply = np.broadcast_to(np.arange(10, 10 + half), (n, half))
    tokens = np.concatenate([prompt, reply], axis=1).astype(np.int32)
    loss_mask = np.zeros((n, length), np.int8)
    loss_mask[:, half:] = 1
    return SFTRows(tokens, loss_mask, np.ones((n, length), np.int32))


def fresh_model(dtype="float32", mesh=None, arch=ARCH):
    model = emjax.models.build(arch, seed=0, dtype=dtype, mesh=mesh)
    return lora.attach(model, LORA, seed=1, mesh=mesh)


def base_values(model):
    return {".".join(map(str, p)): np.asarray(v.get_value()) for p, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}


def lora_values(model):
    return {name: (np.asarray(a.a.get_value()), np.asarray(a.b.get_value())) for name, a in lora.adapters(model)}


def test_loss_decreases_and_only_lora_changes(tmp_path):
    model = fresh_model()
    before_base, before_lora = base_values(model), lora_values(model)
    cfg = dataclasses.replace(FAST, epochs=6, eval_every=8, learning_rate=1e-2)
    history = train.finetune(model, task_rows(), task_rows(8, seed=1), cfg, out_dir=tmp_path, progress=False)
    losses = [r["loss"] for r in history if "loss" in r]
    evals = [r["eval_loss"] for r in history if "eval_loss" in r]
    assert len(losses) == 24 and len(evals) == 3
    assert np.mean(losses[-4:]) < 0.5 * np.mean(losses[:4])
    assert evals[-1] < evals[0]
    after_base = base_values(model)
    assert all(np.array_equal(before_base[k], after_base[k]) for k in before_base)
    assert all(not np.array_equal(before_lora[k][1], b) for k, (_, b) in lora_values(model).items())
    lines = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert lines == history
    assert {"loss", "lr", "grad_norm", "tokens_per_s"} <= set(lines[0])
    # linear warm-up over 2 steps, then linear decay to 0 over the 22 steps left
    np.testing.assert_allclose([r["lr"] for r in lines if "lr" in r][:4], [0, 5e-3, 1e-2, 1e-2 * 21 / 22], rtol=1e-6)


def test_step_matches_a_numpy_adamw_update_on_the_closed_form_loss(tmp_path):
    """One step from known state: the loss equals a torch-free recomputation, the update equals AdamW's first step."""
    model = fresh_model()
    rows = task_rows(8)
    logits = np.asarray(model(jnp.asarray(rows.tokens)).logits, np.float64)
    top = logits.max(-1, keepdims=True)
    logp = logits - top - np.log(np.exp(logits - top).sum(-1, keepdims=True))
    nll = -np.take_along_axis(logp[:, :-1], rows.tokens[:, 1:, None], -1)[..., 0]
    weights = rows.loss_mask[:, 1:]
    expected = (nll * weights).sum() / weights.sum()
    before = lora_values(model)
    cfg = dataclasses.replace(FAST, warmup_steps=0, schedule="constant", max_grad_norm=None, max_steps=1)
    (record,) = train.finetune(model, rows, None, cfg, out_dir=tmp_path, progress=False)
    np.testing.assert_allclose(record["loss"], expected, rtol=1e-5)
    # Adam's first step moves every parameter with a non-zero gradient by lr * sign(grad) (eps aside).
    for name, (a, b) in lora_values(model).items():
        moved = np.abs(b - before[name][1])
        assert np.all((moved < 1e-9) | (np.abs(moved - 3e-3) < 1e-5)), name
        np.testing.assert_array_equal(a, before[name][0])  # B was 0, so A had no gradient yet


def test_accumulation_equals_one_large_batch(tmp_path):
    rows = task_rows(16)
    rows.loss_mask[::3, -3:] = 0  # unequal assistant-token counts per micro-batch
    results = []
    for micro in (None, 2):
        model = fresh_model()
        cfg = dataclasses.replace(FAST, micro_batch_size=micro, max_steps=3)
        history = train.finetune(model, rows, None, cfg, out_dir=tmp_path / str(micro), progress=False)
        results.append(([r["loss"] for r in history], lora_values(model)))
    np.testing.assert_allclose(results[0][0], results[1][0], rtol=1e-5)
    for name, (_, b) in results[0][1].items():
        np.testing.assert_allclose(results[1][1][name][1], b, atol=1e-6)


@pytest.mark.slow
def test_sharded_step_equals_single_device(tmp_path):
    assert jax.device_count() == 8
    rows = task_rows(16)
    cfg = dataclasses.replace(FAST, max_steps=2, micro_batch_size=4)
    single = fresh_model()
    ref = train.finetune(single, rows, None, cfg, out_dir=tmp_path / "one", progress=False)
    mesh = distributed.make_mesh(data=2, fsdp=2, tensor=2)
    sharded = fresh_model(mesh=mesh)
    got = train.finetune(sharded, rows, None, cfg, out_dir=tmp_path / "mesh", mesh=mesh, progress=False)
    np.testing.assert_allclose([r["loss"] for r in got], [r["loss"] for r in ref], rtol=1e-5)
    for name, (_, b) in lora_values(single).items():
        np.testing.assert_allclose(lora_values(sharded)[name][1], b, atol=1e-6)
    (name, adapter), *_ = lora.adapters(sharded)
    assert adapter.a.get_value().sharding.spec[0] == "fsdp"  # A [embed, r] split like its weight's embed dim


@pytest.mark.slow
def test_gpt_oss_attention_adapters_train_with_expert_parallelism(tmp_path):
    arch = dict(
        model_type="gpt_oss", vocab_size=64, hidden_size=32, intermediate_size=32, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=8, num_local_experts=8, num_experts_per_tok=2,
        sliding_window=4,
    )  # fmt: skip
    config = LoRAConfig(rank=4, alpha=8, targets=("q_proj", "k_proj", "v_proj", "o_proj"))
    cfg = dataclasses.replace(FAST, max_steps=2, micro_batch_size=4)
    losses = []
    for mesh in (None, distributed.make_mesh(data=2, expert=4)):
        model = lora.attach(emjax.models.build(arch, seed=0, dtype="float32", mesh=mesh), config, mesh=mesh)
        history = train.finetune(
            model, task_rows(16), None, cfg, out_dir=tmp_path / str(mesh), mesh=mesh, progress=False
        )
        losses.append([r["loss"] for r in history])
    np.testing.assert_allclose(losses[1], losses[0], rtol=1e-5)
    assert losses[0][1] != losses[0][0]


@pytest.mark.slow
def test_resume_after_interruption_reproduces_the_run(tmp_path):
    rows = task_rows(24)
    cfg = dataclasses.replace(FAST, epochs=2, checkpoint_every=2)  # 6 steps
    reference = fresh_model()
    ref = train.finetune(reference, rows, None, cfg, out_dir=tmp_path / "ref", progress=False)

    def sigterm_at_step_3(record):
        if record.get("step") == 3:
            os.kill(os.getpid(), signal.SIGTERM)

    model = fresh_model()
    with pytest.raises(train.Interrupted, match="interrupted at step 3"):
        train.finetune(model, rows, None, cfg, out_dir=tmp_path / "run", progress=False, callback=sigterm_at_step_3)

    def crash_at_step_5(record):  # like a kill: no checkpoint at 5, resume from the one at 4
        if record.get("step") == 5:
            raise RuntimeError("killed")

    model = fresh_model()
    with pytest.raises(RuntimeError, match="killed"):
        train.finetune(model, rows, None, cfg, out_dir=tmp_path / "run", progress=False, callback=crash_at_step_5)
    model = fresh_model()
    resumed = train.finetune(model, rows, None, cfg, out_dir=tmp_path / "run", progress=False)
    np.testing.assert_allclose([r["loss"] for r in resumed], [r["loss"] for r in ref], rtol=1e-6)
    for name, (a, b) in lora_values(reference).items():
        np.testing.assert_allclose(lora_values(model)[name][0], a, atol=1e-7)
        np.testing.assert_allclose(lora_values(model)[name][1], b, atol=1e-7)


@pytest.mark.slow
def test_dropout_is_reproducible_and_changes_training(tmp_path):
    rows = task_rows(24)
    cfg = dataclasses.replace(FAST, warmup_steps=0)  # 3 steps; B moves at the first
    runs = {}
    for name, rate in (("a", 0.3), ("b", 0.3), ("none", 0.0)):
        model = lora.attach(emjax.models.build(ARCH, seed=0, dtype="float32"), dataclasses.replace(LORA, dropout=rate))
        runs[name] = [
            r["loss"] for r in train.finetune(model, rows, None, cfg, out_dir=tmp_path / name, progress=False)
        ]
    assert runs["a"] == runs["b"]
    assert runs["a"][1:] != runs["none"][1:]


def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path):
    rows = task_rows(8)
    cfg = dataclasses.replace(FAST, batch_size=1, checkpoint_every=2, max_steps=8)
    poisoned_row = epoch_order(len(rows), 0, 0)[4]  # the row step 5 reads
    rows.tokens[poisoned_row, 3] = 1  # a token no other row uses (task tokens are 2..63)
    model = fresh_model()
    embed = model.embed.get_value()
    model.embed.set_value(embed.at[1].set(jnp.nan))
    with pytest.raises(train.NonFiniteLoss, match=r"step 5: the training loss is nan.*last good checkpoint is step 4"):
        train.finetune(model, rows, None, cfg, out_dir=tmp_path, progress=False)
    assert sorted(int(p.name) for p in (tmp_path / "checkpoints").iterdir() if p.name.isdigit()) == [2, 4]


def test_packed_rows_train_like_separate_rows(tmp_path):
    """Two examples packed in one row give the loss of the two alone (attention and positions per example)."""
    separate = task_rows(8, length=8)
    packed = SFTRows(
        separate.tokens.reshape(4, 16),
        separate.loss_mask.reshape(4, 16),
        (np.ones((4, 2, 8), np.int32) * np.array([1, 2])[None, :, None]).reshape(4, 16),
    )
    cfg = dataclasses.replace(FAST, max_steps=1, batch_size=4)
    model = fresh_model()
    (a,) = train.finetune(model, packed, None, cfg, out_dir=tmp_path / "packed", progress=False)
    model = fresh_model()
    (b,) = train.finetune(
        model, separate, None, dataclasses.replace(cfg, batch_size=8), out_dir=tmp_path / "sep", progress=False
    )
    np.testing.assert_allclose(a["loss"], b["loss"], rtol=1e-5)


def test_bad_batch_settings_are_named(tmp_path):
    with pytest.raises(ValueError, match=r"train.batch_size=8 is not a multiple of train.micro_batch_size=3"):
        train.finetune(fresh_model(), task_rows(), None, dataclasses.replace(FAST, micro_batch_size=3),
                       out_dir=tmp_path, progress=False)  # fmt: skip
    mesh = distributed.make_mesh(data=8)
    with pytest.raises(ValueError, match=r"micro_batch_size=4 must be a multiple of the mesh's data-parallel size 8"):
        train.finetune(fresh_model(mesh=mesh), task_rows(), None, dataclasses.replace(FAST, micro_batch_size=4),
                       out_dir=tmp_path, mesh=mesh, progress=False)  # fmt: skip
    with pytest.raises(ValueError, match="no LoRA adapters"):
        train.finetune(emjax.models.build(ARCH, dtype="float32"), task_rows(), None, FAST, out_dir=tmp_path)


def test_bf16_compute_keeps_fp32_adapters_and_learns(tmp_path):
    model = fresh_model(dtype="bfloat16")
    cfg = dataclasses.replace(FAST, epochs=4, learning_rate=1e-2)
    history = train.finetune(model, task_rows(), None, cfg, out_dir=tmp_path, progress=False)
    losses = [r["loss"] for r in history]
    assert all(np.isfinite(losses)) and np.mean(losses[-3:]) < 0.7 * np.mean(losses[:3])
    (_, adapter), *_ = lora.adapters(model)
    assert adapter.a.get_value().dtype == jnp.float32 and model.embed.get_value().dtype == jnp.bfloat16


def test_callbacks_see_the_live_adapters_and_stop_training_saves(tmp_path):
    rows = task_rows(24)
    cfg = dataclasses.replace(FAST, epochs=2)  # 6 steps
    seen = []

    def stop_at_step_2(step, metrics, model):
        seen.append((step, metrics["loss"], lora_values(model)))
        if step == 2:
            raise loop.StopTraining("loss low enough")

    model = fresh_model()
    history = train.finetune(model, rows, None, cfg, out_dir=tmp_path, progress=False, callbacks=[stop_at_step_2])
    assert [s for s, _, _ in seen] == [1, 2]
    assert [r["loss"] for r in history[:2]] == [loss for _, loss, _ in seen]
    assert history[-1] == {"step": 2, "stopped": "loss low enough"}
    lines = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert lines == history
    assert sorted(int(p.name) for p in (tmp_path / "checkpoints").iterdir() if p.name.isdigit()) == [2]
    for name, (_, b) in lora_values(model).items():
        np.testing.assert_array_equal(seen[-1][2][name][1], b)
        assert not np.array_equal(seen[0][2][name][1], b)  # the first call saw step 1's adapters, not the final ones


def test_extra_loss_joins_the_gradient_once_per_step(tmp_path):
    """k * sum(A): A has no cross-entropy gradient while B = 0, so the first step's gradient on A is exactly k
    (with or without accumulation) and Adam moves every A entry by -lr."""
    k = 0.25
    rows = task_rows(8)
    cfg = dataclasses.replace(FAST, warmup_steps=0, schedule="constant", max_grad_norm=None, max_steps=1)

    def sum_of_a(model, batch):
        total = sum(jnp.sum(adapter.a.get_value()) for _, adapter in lora.adapters(model))
        return k * total, {"a_sum": total, "rows": jnp.asarray(batch["tokens"].shape[0], jnp.float32)}

    (plain,) = train.finetune(fresh_model(), rows, None, cfg, out_dir=tmp_path / "plain", progress=False)
    a0 = lora_values(fresh_model())
    n_a = sum(a.size for a, _ in a0.values())
    a_sum = sum(float(a.astype(np.float64).sum()) for a, _ in a0.values())
    for micro in (None, 2):
        model = fresh_model()
        (record,) = train.finetune(
            model, rows, None, dataclasses.replace(cfg, micro_batch_size=micro), out_dir=tmp_path / str(micro),
            progress=False, extra_loss=sum_of_a,
        )  # fmt: skip
        np.testing.assert_allclose(record["lm_loss"], plain["loss"], rtol=1e-5)
        np.testing.assert_allclose(record["a_sum"], a_sum, rtol=1e-4)
        np.testing.assert_allclose(record["extra_loss"], k * a_sum, rtol=1e-4)
        np.testing.assert_allclose(record["loss"], plain["loss"] + k * a_sum, rtol=1e-4)
        assert record["rows"] == (micro or 8)
        np.testing.assert_allclose(record["grad_norm"] ** 2, plain["grad_norm"] ** 2 + k**2 * n_a, rtol=1e-4)
        for name, (a, _) in lora_values(model).items():
            np.testing.assert_allclose(a, a0[name][0] - cfg.learning_rate, atol=1e-6)


@pytest.mark.parametrize(
    "field, value, message",
    [
        ("batch_size", 0, "train.batch_size=0 must be at least 1"),
        ("micro_batch_size", 0, "train.micro_batch_size=0 must be at least 1"),
        ("log_every", 0, "train.log_every=0 must be at least 1"),
        ("max_steps", 0, "train.max_steps=0 must be at least 1"),
        ("checkpoint_every", -1, "train.checkpoint_every=-1 must be 0 or more"),
        ("epochs", 0.0, "train.epochs=0.0 must be positive"),
    ],
)
def test_impossible_sizes_are_named(tmp_path, field, value, message):
    with pytest.raises(ValueError, match=message):
        train.Plan.make(dataclasses.replace(FAST, **{field: value}), 32, 1)


def _program_size(num_layers: int) -> tuple[int, int]:
    """(jaxpr equations, StableHLO lines) of the dry run's LoRA train step at `num_layers` layers."""
    from jax.extend import core

    from emjax import dry_run
    from emjax.config import load_config

    def equations(jaxpr):
        return sum(1 + sum(equations(j) for j in core.jaxprs_in_params(e.params)) for e in jaxpr.eqns)

    config = load_config("tiny")
    config.model.arch = dict(config.model.arch, num_hidden_layers=num_layers)  # Gemma-2, width 64
    mesh = distributed.make_mesh(1, 1, 1, 1, devices=jax.devices()[:1])
    program = dry_run.step_programs(config, mesh=mesh, steps=("train",))["train"]
    jaxpr = jax.make_jaxpr(program.function)(*program.arguments)
    return equations(jaxpr.jaxpr), len(program.function.lower(*program.arguments).as_text().splitlines())


def test_the_train_step_program_does_not_grow_with_depth():
    """Layers are scanned (Gemma-2 in local/global pairs): 46 layers (Gemma-2-27B's depth) trace and lower
    to as many equations and StableHLO lines as 4 do, so compile time does not grow with depth."""
    assert _program_size(46) == _program_size(4)
