"""Random tiny transformers models, saved as sharded checkpoints, as the parity oracle."""

from __future__ import annotations

import numpy as np
import torch

LLAMA3_ROPE = {
    "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
    "original_max_position_embeddings": 64,  # small, so that scaling changes the frequencies used here
}  # fmt: skip


def random_gemma2(tmp_path, *, seed=0, std=0.2, max_shard_size="40KB", **overrides):
    """A Gemma2ForCausalLM with random weights (norms included), saved in several safetensors files."""
    from transformers import Gemma2Config, Gemma2ForCausalLM

    kwargs = dict(
        vocab_size=97, hidden_size=32, intermediate_size=48, num_hidden_layers=3, num_attention_heads=4,
        num_key_value_heads=2, head_dim=8, sliding_window=4, query_pre_attn_scalar=10,
    )  # fmt: skip
    model = Gemma2ForCausalLM(Gemma2Config(**kwargs | overrides, attn_implementation="eager"))
    return _save_random(model, tmp_path, "gemma2", seed, std, max_shard_size)


def reference(model, tokens, attention_mask=None):
    """HF logits and hidden states, with rotary positions that skip left padding."""
    tokens = torch.as_tensor(np.asarray(tokens))
    kwargs = {}
    if attention_mask is not None:
        mask = torch.as_tensor(np.asarray(attention_mask))
        kwargs = dict(attention_mask=mask, position_ids=(mask.cumsum(1) - 1).clamp(min=0))
    with torch.no_grad():
        out = model(tokens, output_hidden_states=True, **kwargs)
    return out.logits.numpy(), [h.numpy() for h in out.hidden_states]


def pre_norm_last_hidden(model, tokens):
    """The residual stream after the last block, before the final norm (HF normalises hidden_states[-1])."""
    seen = {}
    handle = model.model.norm.register_forward_hook(lambda mod, args, out: seen.setdefault("x", args[0]))
    with torch.no_grad():
        model(torch.as_tensor(np.asarray(tokens)))
    handle.remove()
    return seen["x"].numpy()


def random_llama(tmp_path, *, seed=0, std=0.2, max_shard_size="40KB", **overrides):
    """A LlamaForCausalLM with random weights, saved in several safetensors files."""
    from transformers import LlamaConfig, LlamaForCausalLM

    kwargs = dict(
        vocab_size=96, hidden_size=32, intermediate_size=48, num_hidden_layers=3, num_attention_heads=4,
        num_key_value_heads=2, head_dim=8, tie_word_embeddings=False,
    )  # fmt: skip
    model = LlamaForCausalLM(LlamaConfig(**kwargs | overrides, attn_implementation="eager"))
    return _save_random(model, tmp_path, "llama", seed, std, max_shard_size)


def _save_random(model, tmp_path, name, seed, std, max_shard_size):
    torch.manual_seed(seed)
    model = model.eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, std)
    path = tmp_path / f"{name}-{seed}"
    model.save_pretrained(path, max_shard_size=max_shard_size)
    return model, path


def assert_close(ours, ref, rel=1e-4):
    """max |ours - ref| <= rel x max |ref| (the parity criterion of the model issues)."""
    ours, ref = np.asarray(ours), np.asarray(ref)
    assert ours.shape == ref.shape, (ours.shape, ref.shape)
    err, scale = np.abs(ours - ref).max(), np.abs(ref).max()
    assert err <= rel * scale, f"max abs diff {err:.3g} > {rel} x scale {scale:.3g}"


def random_gpt_oss(tmp_path, *, seed=0, std=0.2, max_shard_size="60KB", **overrides):
    """A GptOssForCausalLM with random weights (sinks, biases and router included), saved dequantised."""
    from transformers import GptOssConfig, GptOssForCausalLM

    kwargs = dict(
        vocab_size=96, hidden_size=32, intermediate_size=24, num_hidden_layers=3, num_attention_heads=4,
        num_key_value_heads=2, head_dim=8, num_local_experts=4, num_experts_per_tok=2, sliding_window=4,
        rope_parameters={"rope_type": "yarn", "rope_theta": 150000.0, "factor": 32.0, "beta_fast": 32.0,
                         "beta_slow": 1.0, "truncate": False, "original_max_position_embeddings": 4096},
    )  # fmt: skip
    model = GptOssForCausalLM(GptOssConfig(**kwargs | overrides, attn_implementation="eager"))
    return _save_random(model, tmp_path, "gpt_oss", seed, std, max_shard_size)


def hf_greedy(hf, prompts, max_new_tokens, eos, min_new_tokens=0):
    """transformers' greedy generate on left-padded prompts: each row's new tokens, up to its first eos
    (eos: one id, a list of ids, or None)."""
    length = max(map(len, prompts))
    ids = torch.tensor([[0] * (length - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (length - len(p)) + [1] * len(p) for p in prompts])
    with torch.no_grad():
        out = hf.generate(
            ids, attention_mask=mask, max_new_tokens=max_new_tokens, do_sample=False,
            pad_token_id=0, eos_token_id=eos, min_new_tokens=min_new_tokens,
        )  # fmt: skip
    stops = eos if isinstance(eos, list) else [eos]
    rows = []
    for row in out[:, length:].tolist():
        cut = next((t + 1 for t, tok in enumerate(row) if tok in stops), len(row))
        rows.append(row[:cut])
    return rows
