"""The dry run sizes each step per device before a pod is rented.

Oracles: the per-device bytes of every argument summed from the shard shapes of
the abstract arrays; the model card's parameter count (gemma27b); closed forms
for what a remat policy stores per layer, for a matmul's FLOPs and for the
bytes a chain of operations keeps alive.
"""

import math
import os
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import emjax.models
from emjax import distributed, estimate, footprint, jaxpr_count, lora, train
from emjax.config import apply_overrides, load_config
from emjax.dry_run import GIB, architecture, dry_run, fit_micro_batch, step_programs

ROOT = Path(__file__).resolve().parents[1]
GEMMA27B_PARAMS = 27_227_128_320  # the model card's count


def _device_bytes(tree) -> int:
    """Bytes one device holds of the abstract arrays in `tree` (all devices hold equal shards here)."""
    return sum(math.prod(a.sharding.shard_shape(a.shape)) * np.dtype(a.dtype).itemsize for a in jax.tree.leaves(tree))


def _gemma27b(*overrides):
    config = apply_overrides(load_config("gemma27b"), list(overrides))
    config.model.checkpoint_env = None  # never a local checkpoint: the published architecture
    return config


def test_tiny_config_counts_and_compiles_every_step_on_eight_devices():
    config = load_config("tiny")
    reports = {r.step: r for r in dry_run(config, hbm_gib=1.0)}
    assert list(reports) == ["extract", "train", "decode"]
    programs = step_programs(config, mesh=distributed.make_mesh(-1))
    for step, r in reports.items():
        assert r.source == "analytic" and r.fits and 0 < r.total_bytes < GIB
        assert r.total_bytes == r.analytic.total
        # The arguments the step reads, counted from their shards, are those the CPU compiler keeps:
        # all of them but, in extract, the SAE's decoder and the final norm (an encode at layer 2 of 4).
        unread = _device_bytes(programs[step].arguments[1]["W_dec"]) + 256 if step == "extract" else 0
        assert r.analytic.terms["arguments"] == _device_bytes(programs[step].arguments) - unread
        assert r.compiled.backend == "cpu"
        assert r.compiled.argument_bytes == r.analytic.terms["arguments"], step
        assert r.to_json()["cpu_second_opinion"]["total_bytes"] == r.compiled.total_bytes


def test_gemma27b_fits_eight_80gib_devices_and_not_4gib():
    config = _gemma27b()
    reports = dry_run(config, hbm_gib=80.0, compile_steps=False)
    weights_share = GEMMA27B_PARAMS * 2 / 8  # bf16, FSDP over 8
    assert [r.step for r in reports] == ["extract", "train", "decode"]
    for r in reports:
        assert r.fits and r.total_bytes <= 0.9 * 80 * GIB, r.to_json()
        assert r.analytic.total >= weights_share
    train_args = {r.step: r for r in reports}["train"].analytic.terms["arguments"]
    assert train_args >= weights_share and train_args == pytest.approx(weights_share, rel=0.4)
    assert not any(r.fits for r in dry_run(config, hbm_gib=4.0, compile_steps=False))


@pytest.mark.parametrize("remat", ["block", "attention"])
def test_stored_activations_follow_the_remat_policy(remat):
    """Oracle, per device and layer group of two layers (batch 2 of 16 over 8 devices, fp32 tiny):
    "block" keeps each block's input [2, T, D]; "attention" also q, k, v and attention's output
    (held twice, by the forward scan and the backward's copy)."""
    config = apply_overrides(load_config("tiny"), [f"train.remat={remat}"])
    (r,) = dry_run(config, hbm_gib=1.0, steps=("train",), compile_steps=False)
    arch = config.model.arch
    tokens, d = 2 * config.data.max_length, arch["hidden_size"]
    per_layer = tokens * d
    if remat == "attention":
        h, g, k = arch["num_attention_heads"], arch["num_key_value_heads"], arch["head_dim"]
        per_layer += tokens * (2 * h * k + 2 * g * k)
    groups, copies = arch["num_hidden_layers"] // 2, footprint.SCAN_RESIDUAL_COPIES
    expected = copies * (groups - 1) * 2 * per_layer * 4
    # Beyond the closed form: the few int32 [2, T] position arrays the blocks close over.
    assert expected <= r.analytic.terms["stored"] <= expected + copies * (groups - 1) * 4 * tokens * 4


def test_fit_picks_the_largest_micro_batch_that_fits():
    config = load_config("tiny")  # batch 16 over 8 data shards: micro-batch 16 or 8
    sizes = {
        micro: dry_run(apply_overrides(config, [f"train.micro_batch_size={micro}"]), steps=("train",),
                       compile_steps=False)[0].total_bytes
        for micro in (16, 8)
    }  # fmt: skip
    assert sizes[8] < sizes[16]
    between = (sizes[8] + sizes[16]) / 2 / 0.9 / GIB
    micro, tried = fit_micro_batch(config, hbm_gib=between)
    assert micro == 8 and [r.shapes["micro_batch"] for r in tried] == [16, 8]
    assert fit_micro_batch(config, hbm_gib=1.0)[0] == 16
    assert fit_micro_batch(config, hbm_gib=sizes[8] / GIB / 2)[0] is None


@pytest.mark.slow
def test_a_step_that_does_not_fit_is_refused_with_its_numbers():
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    env.pop("XLA_FLAGS", None)  # the command sets its own fake devices
    result = subprocess.run(
        [sys.executable, "-m", "emjax.dry_run", "--config=tiny", "--devices=8", "--hbm_gib=0.0001", "--steps=decode",
         "--no_compile"],
        capture_output=True, text=True, env=env, cwd=ROOT, timeout=300,
    )  # fmt: skip
    assert result.returncode == 1, result.stderr
    assert "step 'decode' needs" in result.stderr and "arguments_bytes" in result.stderr
    assert '"fits": false' in result.stdout and '"source": "analytic"' in result.stdout


def test_train_step_arguments_are_laid_out_as_the_trainer_lays_them_out():
    """Oracle: a real tiny model with adapters on an fsdp mesh, its optimiser state placed as finetune does."""
    config = apply_overrides(load_config("tiny"), ["mesh.data=1", "mesh.fsdp=8"])
    mesh = distributed.make_mesh(1, 8)
    (params, opt_state, base, _, _) = step_programs(config, mesh=mesh, steps=("train",))["train"].arguments
    hf, _ = architecture(config)
    model = emjax.models.build(hf, dtype="float32", mesh=mesh)
    lora.attach(model, config.lora, seed=config.seed, mesh=mesh)
    _, real_params, _, real_base = train.split_adapters(model)
    optimizer, _ = train.make_optimizer(config.train, 10)
    real_opt = distributed.onto_mesh(optimizer.init(real_params), mesh)
    for abstract, real in [(params, real_params), (opt_state, real_opt), (base, real_base)]:
        # (The real state wraps values in nnx.Param; the abstract one passes the bare arrays.)
        assert len(jax.tree.leaves(abstract)) == len(jax.tree.leaves(real)) > 0
        for a, r in zip(jax.tree.leaves(abstract), jax.tree.leaves(real)):
            assert (a.shape, a.dtype) == (r.shape, r.dtype)
            assert a.sharding.shard_shape(a.shape) == r.sharding.shard_shape(r.shape)


def test_topology_compile_reports_per_chip_bytes():
    pytest.importorskip("libtpu")  # the optional extra (pip install 'emjax[tpu]'); never needed by default
    from emjax.dry_run import topology_devices

    config = apply_overrides(load_config("tiny"), ["mesh.data=1", "mesh.fsdp=-1"])
    reports = dry_run(config, devices=topology_devices("v5p:2x2x2"), hbm_gib=95.0)
    for r in reports:
        assert r.source == "compiled" and r.compiled.backend == "tpu" and r.fits
        assert r.total_bytes == r.compiled.total_bytes >= r.compiled.argument_bytes > 0


# ---------------------------------------------------------------------------- the counts themselves


def test_matmul_flops_multiply_scan_bodies_by_their_length():
    def f(w, x):
        return jax.lax.scan(lambda c, wi: (jnp.tanh(c @ wi), None), x, w)[0]

    for layers in (2, 8):
        jaxpr = jax.make_jaxpr(f)(jnp.ones((layers, 64, 64)), jnp.ones((16, 64)))
        assert jaxpr_count.matmul_flops(jaxpr) == layers * 2 * 16 * 64 * 64


def test_peak_live_bytes_of_a_chain():
    """[1000] fp32 values (4000 bytes), the inputs not counted: an elementwise chain is fused into one
    written value; a matmul's operand and output are written out, each dying at its last reader."""

    def elementwise(x):
        return jnp.exp(jnp.sin(jnp.cos(x)))

    def through_a_matmul(x, w):
        return jnp.exp(jnp.cos(x) @ w)

    x, w = jnp.ones(1000), jnp.ones((1000, 1000))
    assert jaxpr_count.peak_live_bytes(jax.make_jaxpr(elementwise)(x)) == 4000
    assert jaxpr_count.peak_live_bytes(jax.make_jaxpr(through_a_matmul)(x, w)) == 2 * 4000


def test_forward_flops_match_the_closed_form():
    """The tiny Gemma-2 extract step: 2 x tokens x (projections and MLP per layer) + attention over the
    full square (scores and values), for the layers up to the deepest extract layer, then the SAE encode."""
    config = load_config("tiny")
    mesh = distributed.make_mesh(-1)
    program = step_programs(config, mesh=mesh, steps=("extract",), sae_width=512)["extract"]
    a = config.model.arch
    d, f, h, g, k = a["hidden_size"], a["intermediate_size"], a["num_attention_heads"], a["num_key_value_heads"], a[
        "head_dim"]  # fmt: skip
    b, t, layers = program.shapes["batch"], program.shapes["length"], program.shapes["layer"] + 1
    per_layer = 2 * b * t * (d * h * k + 2 * d * g * k + h * k * d + 3 * d * f) + 2 * 2 * b * h * t * t * k
    expected = layers * per_layer + 2 * b * t * d * 512
    got = jaxpr_count.matmul_flops(jax.make_jaxpr(program.function)(*program.arguments))
    assert got == pytest.approx(expected, rel=1e-6)


def test_estimate_lists_each_stage_and_a_total():
    config = _gemma27b()
    mesh = distributed.make_mesh(1, -1)
    programs = step_programs(config, mesh=mesh)
    hf = architecture(config)[0]
    table = estimate.study_estimate(config, hf, programs, mesh, estimate.DEVICES["h100"])
    stages = [row["stage"] for row in table]
    assert stages[:3] == ["extract", "features", "train"] and stages[-1] == "total"
    assert table[-1]["seconds"] == pytest.approx(sum(r["seconds"] for r in table[:-1]), abs=1)
    train_row = table[stages.index("train")]
    # A LoRA step of 16 x 1024 tokens: forward, remat's recomputation and input gradients, 2 N T FLOPs each.
    cost = estimate.step_costs({"train": programs["train"]}, mesh, hidden_size=hf["hidden_size"],
                               num_layers=hf["num_hidden_layers"], itemsize=2)["train"]
    assert cost.flops >= 6 * GEMMA27B_PARAMS * 0.95 * 16 * 1024
    assert train_row["bound"] in ("compute", "memory", "interconnect")
    assert estimate.device_of("v5p:2x2x2") is estimate.DEVICES["v5p"]
    assert estimate.device_of("NVIDIA H200") is estimate.DEVICES["h200"]
    assert footprint.TERMS == ("arguments", "gathered", "stored", "working")
