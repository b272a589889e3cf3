"""Llama-3 details: the llama3 RoPE scaling matters, and saved checkpoints reopen in transformers."""

import json

import jax.numpy as jnp
import numpy as np
import pytest

import emjax.models
from hf_oracle import LLAMA3_ROPE, assert_close, random_llama, reference


@pytest.mark.slow
def test_llama3_rope_scaling_is_applied(tmp_path):
    hf, path = random_llama(tmp_path, rope_scaling=LLAMA3_ROPE)
    ids = np.random.RandomState(0).randint(0, 96, (1, 12))
    ref = reference(hf, ids)[0]
    assert_close(emjax.models.load(path, dtype="float32")(jnp.asarray(ids)).logits, ref)
    config = json.loads((path / "config.json").read_text())
    config.pop("rope_scaling", None)
    config["rope_parameters"] = {"rope_type": "default", "rope_theta": config["rope_parameters"]["rope_theta"]}
    (path / "config.json").write_text(json.dumps(config))
    unscaled = np.asarray(emjax.models.load(path, dtype="float32")(jnp.asarray(ids)).logits)
    assert np.abs(unscaled - ref).max() > 1e-3 * np.abs(ref).max()


def test_saved_llama_opens_in_transformers(tmp_path):
    from transformers import LlamaForCausalLM

    _, path = random_llama(tmp_path, rope_scaling=LLAMA3_ROPE, attention_bias=True)
    model = emjax.models.load(path, dtype="float32")
    emjax.models.save(model, tmp_path / "saved")
    reopened = LlamaForCausalLM.from_pretrained(tmp_path / "saved", attn_implementation="eager").eval()
    ids = np.random.RandomState(1).randint(0, 96, (2, 9))
    assert_close(model(jnp.asarray(ids)).logits, reference(reopened, ids)[0], rel=1e-5)
