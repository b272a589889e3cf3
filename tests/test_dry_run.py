"""The dry run compiles each step from abstract weights and reports per-device memory.

Oracle: the per-device bytes of every argument, summed from the shard shapes
of the abstract arrays (and, for gemma27b, the model card's parameter count).
gemma27b compiles only its decode step, at a short cache: compile time on a
CPU grows with the 46 unrolled layers, not with the shapes, and the decode
step takes every weight as an argument.
"""

import math
import os
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest

import emjax.models
from emjax import distributed, lora, train
from emjax.config import apply_overrides, load_config
from emjax.dry_run import GIB, architecture, compile_steps, dry_run, measure, step_programs

ROOT = Path(__file__).resolve().parents[1]


def _device_bytes(tree) -> int:
    """Bytes one device holds of the abstract arrays in `tree` (all devices hold equal shards here)."""
    return sum(math.prod(a.sharding.shard_shape(a.shape)) * np.dtype(a.dtype).itemsize for a in jax.tree.leaves(tree))


@pytest.mark.slow
def test_tiny_config_reports_per_device_memory_on_eight_devices():
    config = load_config("tiny")
    mc = config.mesh
    mesh = distributed.make_mesh(mc.data, mc.fsdp, mc.tensor, mc.expert)
    assert mesh.size == 8
    compiled = compile_steps(config, mesh=mesh)
    reports = {r.step: r for r in measure(compiled, hbm_gib=1.0)}
    assert list(reports) == ["extract", "train", "decode"]
    for r in reports.values():
        assert min(r.argument_bytes, r.output_bytes, r.temp_bytes) > 0
        assert r.total_bytes == r.argument_bytes + r.output_bytes + r.temp_bytes - r.alias_bytes
        assert r.fits and r.total_bytes < GIB
    # The decode and train steps use every argument: the compiled plan holds exactly their shards.
    for step in ("decode", "train"):
        expected = _device_bytes(compiled[step].arguments)
        assert reports[step].argument_bytes == pytest.approx(expected, rel=0.01), step


@pytest.mark.slow
def test_gemma27b_bf16_weights_split_eight_ways_from_the_published_architecture():
    config = apply_overrides(load_config("gemma27b"), ["data.max_length=16", "extract.batch_size=8"])
    config.model.checkpoint_env = None  # never a local checkpoint: the published architecture
    assert architecture(config)[1] == "emjax.models.published['gemma-2-27b']"
    (decode,) = dry_run(config, hbm_gib=16.0, steps=("decode",))
    weights_per_device = 27.2e9 * 2 / 8
    assert decode.argument_bytes == pytest.approx(weights_per_device, rel=0.15)


@pytest.mark.slow
def test_a_step_that_does_not_fit_is_refused_with_its_numbers():
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    env.pop("XLA_FLAGS", None)  # the command sets its own fake devices
    result = subprocess.run(
        [sys.executable, "-m", "emjax.dry_run", "--config=tiny", "--devices=8", "--hbm_gib=0.0001", "--steps=decode"],
        capture_output=True,
        text=True,
        env=env,
        cwd=ROOT,
        timeout=300,
    )
    assert result.returncode == 1, result.stderr
    assert "step 'decode' needs" in result.stderr and "arguments" in result.stderr
    assert '"fits": false' in result.stdout


def test_train_step_arguments_are_laid_out_as_the_trainer_lays_them_out():
    """Oracle: a real tiny model with adapters on an fsdp mesh, its optimiser state placed as finetune does."""
    config = apply_overrides(load_config("tiny"), ["mesh.data=1", "mesh.fsdp=8"])
    mesh = distributed.make_mesh(1, 8)
    (params, opt_state, base, _, _) = step_programs(config, mesh=mesh, steps=("train",))["train"].arguments
    hf, _ = architecture(config)
    model = emjax.models.build(hf, dtype="float32", mesh=mesh)
    lora.attach(model, config.lora, seed=config.seed, mesh=mesh)
    _, real_params, _, real_base = train._split(model)
    optimizer, _ = train.make_optimizer(config.train, 10)
    real_opt = distributed.onto_mesh(optimizer.init(real_params), mesh)
    for abstract, real in [(params, real_params), (opt_state, real_opt), (base, real_base)]:
        # (The real state wraps values in nnx.Param; the abstract one passes the bare arrays.)
        assert len(jax.tree.leaves(abstract)) == len(jax.tree.leaves(real)) > 0
        for a, r in zip(jax.tree.leaves(abstract), jax.tree.leaves(real)):
            assert (a.shape, a.dtype) == (r.shape, r.dtype)
            assert a.sharding.shard_shape(a.shape) == r.sharding.shard_shape(r.shape)
