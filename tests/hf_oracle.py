"""Random tiny transformers models, saved as sharded checkpoints, as the parity oracle."""

from __future__ import annotations

import numpy as np
import torch


def random_gemma2(tmp_path, *, seed=0, std=0.2, max_shard_size="40KB", **overrides):
    """A Gemma2ForCausalLM with random weights (norms included), saved in several safetensors files."""
    from transformers import Gemma2Config, Gemma2ForCausalLM

    kwargs = dict(
        vocab_size=97,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        sliding_window=4,
        query_pre_attn_scalar=10,
    )
    kwargs.update(overrides)
    config = Gemma2Config(**kwargs, attn_implementation="eager")
    torch.manual_seed(seed)
    model = Gemma2ForCausalLM(config).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, std)
    path = tmp_path / f"gemma2-{seed}"
    model.save_pretrained(path, max_shard_size=max_shard_size)
    return model, path


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
