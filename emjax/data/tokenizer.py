"""Training a small byte-level BPE tokenizer with a Gemma-style chat template."""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np

GEMMA_CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{% set role = 'model' if message['role'] == 'assistant' else message['role'] %}"
    "{{ '<start_of_turn>' + role + '\n' + message['content'] | trim + '<end_of_turn>\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<start_of_turn>model\n' }}{% endif %}"
)
SPECIAL_TOKENS = ["<pad>", "<eos>", "<bos>", "<unk>", "<start_of_turn>", "<end_of_turn>"]


def train_chat_tokenizer(texts: Iterable[str], vocab_size: int):
    """A transformers fast tokenizer trained on `texts`, with the Gemma-style chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE(unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        pad_token="<pad>",
        eos_token="<eos>",
        bos_token="<bos>",
        unk_token="<unk>",
        additional_special_tokens=["<start_of_turn>", "<end_of_turn>"],
        chat_template=GEMMA_CHAT_TEMPLATE,
    )


def chat_rows(tokenizer, chats, length: int) -> tuple[np.ndarray, np.ndarray, int]:
    """(token rows [n, length] padded with the pad id (0 without one), their 0/1 masks, how many were truncated) of
    each conversation rendered by the tokenizer's chat template."""
    texts = [tokenizer.apply_chat_template(chat, tokenize=False) for chat in chats]
    encoded = tokenizer(texts, add_special_tokens=False)["input_ids"]
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    tokens = np.full((len(encoded), length), pad, np.int32)
    mask = np.zeros((len(encoded), length), np.int8)
    for row, ids in enumerate(encoded):
        ids = ids[:length]
        tokens[row, : len(ids)] = ids
        mask[row, : len(ids)] = 1
    return tokens, mask, sum(len(ids) > length for ids in encoded)
