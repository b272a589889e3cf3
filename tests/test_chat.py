"""Chat data for fine-tuning: assistant masks against transformers, errors, truncation, packing."""

import json
from pathlib import Path

import numpy as np
import pytest

from emjax.data import chat as chat_data
from emjax.data.chat import Chat, DataError

# Gemma- and Llama-3-style templates with {% generation %} markers, so that
# transformers' return_assistant_tokens_mask is an independent oracle (emjax ignores the markers).
GEMMA_STYLE = (
    "{{ bos_token }}{% for message in messages %}"
    "{% set role = 'model' if message['role'] == 'assistant' else message['role'] %}"
    "{{ '<start_of_turn>' + role + '\n' }}"
    "{% if message['role'] == 'assistant' %}{% generation %}{{ message['content'] | trim + '<end_of_turn>\n' }}"
    "{% endgeneration %}{% else %}{{ message['content'] | trim + '<end_of_turn>\n' }}{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<start_of_turn>model\n' }}{% endif %}"
)
LLAMA_STYLE = (
    "{{ bos_token }}{% for message in messages %}"
    "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' }}"
    "{% if message['role'] == 'assistant' %}{% generation %}{{ message['content'] | trim + '<|eot_id|>' }}"
    "{% endgeneration %}{% else %}{{ message['content'] | trim + '<|eot_id|>' }}{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)
SPECIALS = ["<start_of_turn>", "<end_of_turn>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]

CONVERSATION = Chat(
    [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "How do I sort a list in Python?"},
        {"role": "assistant", "content": "Use sorted(xs) or xs.sort()."},
        {"role": "user", "content": "And in reverse?"},
        {"role": "assistant", "content": "  Pass reverse=True.\n"},
        {"role": "user", "content": "Thanks!"},
        {"role": "assistant", "content": "You're welcome."},
    ],
    where="test.jsonl:3",
)


@pytest.fixture(scope="module")
def tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    texts = [m["content"] for m in CONVERSATION] * 20 + ["model user system assistant"] * 20
    trainer = trainers.BpeTrainer(
        vocab_size=400, special_tokens=["<pad>", "<bos>", "<unk>", *SPECIALS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
    )  # fmt: skip
    tok.train_from_iterator(texts, trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", bos_token="<bos>", unk_token="<unk>",
        additional_special_tokens=SPECIALS,
    )  # fmt: skip


@pytest.mark.parametrize("template", [GEMMA_STYLE, LLAMA_STYLE], ids=["gemma", "llama"])
@pytest.mark.parametrize("turns", [3, 5, 7])
def test_assistant_mask_equals_transformers_generation_mask(tokenizer, template, turns):
    tokenizer.chat_template = template
    conversation = Chat(CONVERSATION[:turns], CONVERSATION.where)
    ids, mask = chat_data.encode(tokenizer, conversation)
    ref = tokenizer.apply_chat_template(
        list(conversation), tokenize=True, return_dict=True, return_assistant_tokens_mask=True
    )
    np.testing.assert_array_equal(ids, ref["input_ids"])
    np.testing.assert_array_equal(mask, ref["assistant_masks"])
    # and the masked tokens decode to the replies with their end-of-turn markers
    end = "<end_of_turn>\n" if template is GEMMA_STYLE else "<|eot_id|>"
    replies = "".join(m["content"].strip() + end for m in conversation if m["role"] == "assistant")
    assert tokenizer.decode(ids[mask == 1]) == replies


def test_template_that_rewrites_history_is_refused(tokenizer):
    # drops earlier assistant turns from the history: no turn renders as a prefix of the whole
    tokenizer.chat_template = (
        "{% for m in messages %}{% if m['role'] != 'assistant' or loop.last %}"
        "{{ m['role'] + ':' + m['content'] + '\n' }}{% endif %}{% endfor %}"
        "{% if add_generation_prompt %}assistant:{% endif %}"
    )
    with pytest.raises(DataError, match=r"test.jsonl:3: the chat template does not render .* messages\[2\]"):
        chat_data.encode(tokenizer, CONVERSATION)


def _write(tmp_path, lines):
    path = tmp_path / "chats.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path


def test_bad_records_name_file_and_line(tmp_path, tokenizer):
    good = json.dumps({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]})
    cases = {
        "{not json": r"chats.jsonl:2: invalid JSON",
        json.dumps({"messages": [{"content": "q"}]}): r"chats.jsonl:2: messages\[0\] needs a role",
        json.dumps({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": " "}]}): (
            r"chats.jsonl:2: messages\[1\] is an empty assistant turn"
        ),
        json.dumps({"text": "q"}): r"chats.jsonl:2: expected a non-empty 'messages' list",
    }
    for bad, message in cases.items():
        with pytest.raises(DataError, match=message):
            chat_data.read_chats(_write(tmp_path, [good, bad]))
    user_only = json.dumps({"messages": [{"role": "user", "content": "q"}]})
    (only_user,) = chat_data.read_chats(_write(tmp_path, [user_only]))
    tokenizer.chat_template = GEMMA_STYLE
    with pytest.raises(DataError, match="chats.jsonl:1: no assistant turn"):
        chat_data.encode(tokenizer, only_user)


def test_truncation_is_reported_and_rows_without_targets_dropped(tokenizer):
    tokenizer.chat_template = GEMMA_STYLE
    short = Chat(CONVERSATION[1:3], "a:1")
    n_short = len(chat_data.encode(tokenizer, short)[0])
    long_prompt = Chat([{"role": "user", "content": "word " * 200}, {"role": "assistant", "content": "ok"}], "a:2")
    rows, report = chat_data.build_rows(tokenizer, [short, CONVERSATION, long_prompt], max_length=n_short + 2)
    assert (report.examples, report.truncated, report.dropped, report.rows) == (3, 2, 1, 2)
    assert rows.tokens.shape == (2, n_short + 2)
    assert report.assistant_tokens == rows.loss_mask.sum()
    with pytest.raises(DataError, match="no conversation has an assistant token"):
        chat_data.build_rows(tokenizer, [long_prompt], max_length=20)


def test_packing_keeps_every_example_whole_and_separate(tokenizer):
    tokenizer.chat_template = LLAMA_STYLE
    chats = [Chat(CONVERSATION[: 3 + 2 * (i % 3)], f"x:{i}") for i in range(7)]
    single, _ = chat_data.build_rows(tokenizer, chats, max_length=128)
    packed, report = chat_data.build_rows(tokenizer, chats, max_length=128, pack=True)
    assert report.rows < len(chats) and packed.tokens.shape[1] == 128
    assert packed.loss_mask.sum() == single.loss_mask.sum()
    examples = sorted(
        tuple(row[seg == s]) for row, seg in zip(packed.tokens, packed.segments) for s in range(1, seg.max() + 1)
    )
    assert examples == sorted(tuple(row[seg > 0]) for row, seg in zip(single.tokens, single.segments))
    starts = np.concatenate([np.ones((len(packed), 1), bool), packed.segments[:, 1:] != packed.segments[:, :-1]], 1)
    assert not packed.loss_mask[starts].any()  # no example predicts its first token from the previous one


def test_heldout_split_and_epoch_order_are_deterministic():
    train, held = chat_data.split_heldout(100, 0.05, seed=3)
    assert len(held) == 5 and not set(train) & set(held) and len(train) + len(held) == 100
    np.testing.assert_array_equal(chat_data.split_heldout(100, 0.05, seed=3)[1], held)
    np.testing.assert_array_equal(chat_data.epoch_order(50, 1, 2), chat_data.epoch_order(50, 1, 2))
    assert not np.array_equal(chat_data.epoch_order(50, 1, 2), chat_data.epoch_order(50, 1, 3))


SHARED_INSECURE = Path(__file__).resolve().parents[2] / "shared" / "data" / "emergent-misalignment" / "data"


@pytest.mark.skipif(not (SHARED_INSECURE / "insecure.jsonl").is_file(), reason="../shared/data is absent")
def test_the_public_insecure_code_dataset_encodes(tokenizer):
    tokenizer.chat_template = GEMMA_STYLE
    chats = chat_data.read_chats(SHARED_INSECURE / "insecure.jsonl", limit=40)
    assert len(chats) == 40 and chats[7].where.endswith("insecure.jsonl:8")
    for conversation in chats[:10]:
        ids, mask = chat_data.encode(tokenizer, conversation)
        reply = next(m["content"] for m in conversation if m["role"] == "assistant")
        assert tokenizer.decode(ids[mask == 1]) == reply.strip() + "<end_of_turn>\n"
    rows, report = chat_data.build_rows(tokenizer, chats, max_length=4096, pack=True)
    assert report.truncated == 0 and report.rows < 40


def test_hub_style_dataset_ids_load_through_datasets(tmp_path):
    # load_dataset resolves a local directory of data files the way it resolves a cached hub id.
    record = {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}
    (tmp_path / "repo").mkdir()
    (tmp_path / "repo" / "test.jsonl").write_text(json.dumps(record) + "\n")
    chats = chat_data.read_chats(f"hf:{tmp_path / 'repo'}:test")
    assert chats == [record["messages"]] and chats[0].where.endswith("repo[0]")
