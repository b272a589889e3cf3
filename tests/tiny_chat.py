"""A tiny random Gemma-2-architecture model with a tokenizer trained here (numbers 0..100 in its corpus)."""

from __future__ import annotations

import emjax.models
from emjax.data.synthetic import synthetic_chats
from emjax.data.tokenizer import train_chat_tokenizer

ARCH = dict(
    model_type="gemma2", hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
    num_key_value_heads=2, head_dim=8, sliding_window=16, query_pre_attn_scalar=8,
)  # fmt: skip


def tiny_tokenizer():
    texts = [m["content"] for chat in synthetic_chats(200, seed=0) for m in chat]
    texts += [" ".join(str(i) for i in range(101))] * 3
    return train_chat_tokenizer(texts, vocab_size=400)


def tiny_model(tokenizer, seed=0):
    return emjax.models.build(ARCH | {"vocab_size": -(-len(tokenizer) // 128) * 128}, seed=seed, dtype="float32")


def save_checkpoint(path, seed=0):
    """A checkpoint directory (config.json, safetensors, tokenizer files) as `python -m emjax.serve` reads it."""
    tokenizer = tiny_tokenizer()
    emjax.models.save(tiny_model(tokenizer, seed), path)
    tokenizer.save_pretrained(str(path))
    return path
