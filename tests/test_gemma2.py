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


@pytest.mark.parametrize("family", ["gemma2", "gpt_oss"])
def test_sliding_layers_read_and_write_config_json_as_transformers_does(family):
    """Both sliding-window families: layer_types absent alternate as transformers' own default; to_hf writes
    back what transformers reads; layer_types that do not fit the layers are named as the file's."""
    import transformers

    hf_class = {"gemma2": transformers.Gemma2Config, "gpt_oss": transformers.GptOssConfig}[family]
    sizes = dict(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=5, num_attention_heads=4,
                 num_key_value_heads=2, head_dim=8, sliding_window=16, rms_norm_eps=1e-5, tie_word_embeddings=True)
    reference = hf_class(**sizes)
    hf = {k: v for k, v in reference.to_dict().items() if k != "layer_types"}
    config_class = emjax.models.family_of(hf, source="config").config
    cfg = config_class.from_hf(hf, source="config")
    assert list(cfg.layer_types) == reference.layer_types
    back = hf_class(**cfg.to_hf())
    for key in ("layer_types", "sliding_window", "rms_norm_eps", "tie_word_embeddings", "num_hidden_layers"):
        assert getattr(back, key) == getattr(reference, key), key
    with pytest.raises(ValueError, match="my.json: layer_types"):
        config_class.from_hf(hf | {"layer_types": ["full_attention"] * 4}, source="my.json")
