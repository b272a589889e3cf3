"""Logit and hidden-state parity with transformers on random tiny configs (fp32), every family.

Each model is saved by transformers' save_pretrained (split into several
safetensors files) and loaded through emjax.models.load, so the loader is
tested with it.
"""

import jax.numpy as jnp
import numpy as np
import pytest

import emjax.models
from hf_oracle import (
    LLAMA3_ROPE,
    assert_close,
    pre_norm_last_hidden,
    random_gemma2,
    random_gpt_oss,
    random_llama,
    reference,
)

CASES = {
    # heads 4 / kv 2, window 4 < sequence, query_pre_attn_scalar 10 != head_dim 8
    "gemma2-gqa2": (random_gemma2, {}),
    "gemma2-gqa1": (random_gemma2, dict(num_attention_heads=4, num_key_value_heads=4, query_pre_attn_scalar=6)),
    "gemma2-gqa4": (random_gemma2, dict(
        hidden_size=48, num_attention_heads=8, num_key_value_heads=2, head_dim=16, sliding_window=5,
        query_pre_attn_scalar=24, num_hidden_layers=4,
    )),
    "gemma2-untied-no-softcap": (random_gemma2, dict(
        attn_logit_softcapping=None, final_logit_softcapping=None, tie_word_embeddings=False,
    )),
    "llama-rope3-gqa2": (random_llama, dict(rope_scaling=LLAMA3_ROPE)),
    "llama-gqa4": (random_llama, dict(num_attention_heads=8, num_key_value_heads=2, hidden_size=48, head_dim=6)),
    # sinks with heads (4) != head_dim (8), window 4, YaRN (truncate=false), top-2 of 4 experts
    "gpt-oss-top2": (random_gpt_oss, {}),
    "gpt-oss-top1-mqa": (random_gpt_oss, dict(num_local_experts=6, num_experts_per_tok=1, num_key_value_heads=1)),
    "llama-tied-bias-mha": (random_llama, dict(
        num_key_value_heads=4, tie_word_embeddings=True, attention_bias=True, rope_theta=500000.0,
    )),
}  # fmt: skip


# The larger cases take most of this file's time: the everyday subset (-m "not slow") keeps the small ones.
SLOW_CASES = ("gemma2-gqa2", "gemma2-gqa4", "llama-gqa4", "gpt-oss-top2", "gpt-oss-top1-mqa")


@pytest.fixture(
    params=[pytest.param(c, marks=pytest.mark.slow) if c in SLOW_CASES else c for c in CASES], scope="module"
)
def pair(request, tmp_path_factory):
    make, overrides = CASES[request.param]
    hf, path = make(tmp_path_factory.mktemp(request.param), **overrides)
    return hf, emjax.models.load(path, dtype="float32")


def tokens(shape, vocab=96, seed=1):
    return np.random.RandomState(seed).randint(0, vocab, shape)


def test_logits_and_hidden_states_match_transformers(pair):
    hf, model = pair
    ids = tokens((2, 13))  # longer than every sliding window above
    ref_logits, ref_hidden = reference(hf, ids)
    layers = model.config.num_layers
    out = model(jnp.asarray(ids), capture=tuple(range(layers)))
    assert_close(out.logits, ref_logits)
    for layer in range(layers - 1):
        assert_close(out.captured[layer], ref_hidden[layer + 1])
    # transformers normalises its last hidden state; our capture is the residual stream itself.
    assert_close(out.captured[layers - 1], pre_norm_last_hidden(hf, ids))


def test_left_and_right_padding(pair):
    hf, model = pair
    ids = tokens((4, 12), seed=2)
    mask = np.ones_like(ids)
    mask[0, :5] = 0  # left padding
    mask[1, 9:] = 0  # right padding
    mask[2, :1] = 0
    ref_logits, _ = reference(hf, ids, mask)
    out = model(jnp.asarray(ids), attention_mask=jnp.asarray(mask), capture=(1,))
    real = mask.astype(bool)
    assert_close(np.asarray(out.logits)[real], ref_logits[real])
    # Independently of transformers: a left-padded row equals the same tokens unpadded.
    alone = model(jnp.asarray(ids[:1, 5:]), capture=(1,))
    assert_close(np.asarray(out.logits)[0, 5:], np.asarray(alone.logits)[0])
    assert_close(np.asarray(out.captured[1])[0, 5:], np.asarray(alone.captured[1])[0])


def test_stop_at_layer_gives_the_same_captures_and_no_logits(pair):
    _, model = pair
    ids = jnp.asarray(tokens((2, 9), seed=3))
    full = model(ids, capture=(0, 1))
    stopped = emjax.models.jit_forward(model, capture=(0, 1), stop_at_layer=2)(ids)
    assert stopped.logits is None
    for layer in (0, 1):
        assert_close(stopped.captured[layer], full.captured[layer], rel=1e-6)


def test_capture_outside_the_computed_layers_is_rejected(pair):
    _, model = pair
    ids = jnp.asarray(tokens((1, 4)))
    with pytest.raises(ValueError, match="capture layers"):
        model(ids, capture=(2,), stop_at_layer=2)
    with pytest.raises(ValueError, match="stop_at_layer"):
        model(ids, stop_at_layer=0)


@pytest.mark.parametrize("prefill", [3, 7])  # 7 is longer than the sliding window: the ring wraps during prefill
def test_kv_cache_decoding_reproduces_the_full_forward(pair, prefill):
    hf, model = pair
    length = 15
    ids = tokens((3, length), seed=4)
    mask = np.ones_like(ids)
    mask[1, :2] = 0  # a left-padded prompt
    ref_logits, _ = reference(hf, ids, mask)
    forward = emjax.models.jit_forward(model)
    cache = model.init_cache(batch=3, max_len=length)
    out = forward(jnp.asarray(ids[:, :prefill]), jnp.asarray(mask[:, :prefill]), cache)
    steps = [np.asarray(out.logits)]
    for t in range(prefill, length):
        out = forward(jnp.asarray(ids[:, t : t + 1]), jnp.asarray(mask[:, t : t + 1]), out.cache)
        steps.append(np.asarray(out.logits))
    decoded = np.concatenate(steps, axis=1)
    real = mask.astype(bool)
    assert_close(decoded[real], ref_logits[real])
    assert int(out.cache.length) == length
    np.testing.assert_array_equal(np.asarray(out.cache.next_position), mask.sum(1))


def test_decoding_past_the_cache_gives_nan_logits(pair):
    _, model = pair
    forward = emjax.models.jit_forward(model)
    out = forward(jnp.asarray(tokens((1, 4))), None, model.init_cache(batch=1, max_len=5))
    assert np.isfinite(np.asarray(out.logits)).all()
    out = forward(jnp.asarray(tokens((1, 2))), None, out.cache)
    assert np.isnan(np.asarray(out.logits)).all()
