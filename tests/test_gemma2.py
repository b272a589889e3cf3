"""Gemma-2 details that the shared parity tests do not pin down."""

import jax.numpy as jnp
import numpy as np
import pytest

import emjax.models
from hf_oracle import assert_close, random_gemma2, reference


@pytest.mark.slow
def test_query_scale_comes_from_config_json(tmp_path):
    """query_pre_attn_scalar is read from the checkpoint, not inferred from head_dim or a size table."""
    hf_a, path_a = random_gemma2(tmp_path / "a", query_pre_attn_scalar=8)
    hf_b, path_b = random_gemma2(tmp_path / "b", query_pre_attn_scalar=144)
    ids = np.random.RandomState(5).randint(0, 97, (1, 10))
    a = emjax.models.load(path_a, dtype="float32")(jnp.asarray(ids)).logits
    b = emjax.models.load(path_b, dtype="float32")(jnp.asarray(ids)).logits
    assert_close(a, reference(hf_a, ids)[0])
    assert_close(b, reference(hf_b, ids)[0])
    assert np.abs(np.asarray(a) - np.asarray(b)).max() > 1e-2
