"""The published config.json files give the published parameter counts and shard cleanly.

Only abstract shapes are built (nnx.eval_shape): nothing is allocated. The
architectures and counts live in emjax.models.published.
"""

import functools
import math

import pytest
from flax import nnx

import emjax.models
from emjax import distributed
from emjax.config import ConfigError, load_config
from emjax.models import published
from emjax.models.published import PUBLISHED


@functools.cache
def abstract_state(name):
    hf, _ = PUBLISHED[name]
    family = emjax.models.family_of(hf)
    cfg = family.config.from_hf(hf)
    model = nnx.eval_shape(lambda: family.model(cfg, rngs=nnx.Rngs(0)))
    return cfg, nnx.state(model, nnx.Param)


@pytest.mark.parametrize("name", list(PUBLISHED))
def test_parameter_count_matches_the_model_card(name):
    hf, count = PUBLISHED[name]
    assert emjax.models.parameter_count(hf) == count


@pytest.mark.slow
def test_architecture_numbers_come_from_config_json():
    cfg, _ = abstract_state("gemma-2-27b")
    assert cfg.layer_types[:2] == ("sliding_attention", "full_attention") and cfg.query_pre_attn_scalar == 144
    llama, _ = abstract_state("llama-3.1-8b")
    assert (llama.rope.kind, llama.rope.factor, llama.rope.theta) == ("llama3", 8.0, 500000.0)
    gpt, _ = abstract_state("gpt-oss-20b")
    assert (gpt.rope.kind, gpt.rope.truncate, gpt.window(0), gpt.window(1)) == ("yarn", False, 128, None)


@pytest.mark.parametrize("name", list(PUBLISHED))
@pytest.mark.parametrize(
    "mesh_sizes",
    [dict(data=2, fsdp=2, tensor=2), dict(fsdp=8), dict(data=1, fsdp=2, tensor=4), dict(data=1, fsdp=2, expert=4)],
)
@pytest.mark.slow
def test_published_shapes_shard_over_eight_devices(name, mesh_sizes):
    _, count = PUBLISHED[name]
    mesh = distributed.make_mesh(**mesh_sizes)
    _, state = abstract_state(name)
    shardings = emjax.models.param_shardings(state, mesh)
    per_device = 0
    for path, var in nnx.to_flat_state(state):
        shard = shardings[".".join(map(str, path))].shard_shape(var.shape)
        per_device += math.prod(shard)
    # Everything large is split over fsdp x tensor (only norms, biases and the router are not).
    assert per_device < count / (mesh.shape["fsdp"] * mesh.shape["tensor"]) * 1.01
    if name == "gpt-oss-20b":  # and experts over the expert axis too
        # Layers stacked in (sliding, full) pairs: 12 of each, the layer axis never split.
        gate_up = shardings["blocks.layers.0.experts.gate_up"].shard_shape((12, 32, 2880, 2880, 2))
        assert gate_up == (12, 32 // mesh.shape["expert"], 2880 // mesh.shape["fsdp"], 2880 // mesh.shape["tensor"], 2)


@pytest.mark.parametrize("config_name", ["gemma2_2b", "gemma2_9b", "gemma27b", "llama31_8b", "gptoss20b"])
def test_every_real_config_names_its_published_architecture(config_name):
    config = load_config(config_name)
    assert config.model.arch is None and config.model.published in PUBLISHED
    assert published.config_json(config.model.published) == PUBLISHED[config.model.published].config


def test_an_unknown_published_name_is_refused():
    with pytest.raises(ConfigError, match="model.published='gemma-9'.*gemma-2-2b"):
        published.config_json("gemma-9")
