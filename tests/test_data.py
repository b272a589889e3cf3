"""Chat sources, the synthetic corpus and the trained chat tokenizer."""

import gzip
import json
from pathlib import Path

import pytest

from emjax.data.chat import DataError, read_chat_jsonl, read_chats
from emjax.data.synthetic import synthetic_chats
from emjax.data.tokenizer import train_chat_tokenizer

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


def test_synthetic_corpus_is_deterministic_and_chat_shaped():
    a, b = synthetic_chats(50, seed=1), synthetic_chats(50, seed=1)
    assert a == b and a != synthetic_chats(50, seed=2)
    for chat in a:
        assert [m["role"] for m in chat][:2] == ["user", "assistant"] and len(chat) in (2, 4)


def test_chat_template_renders_the_gemma_turn_format(tmp_path):
    tok = train_chat_tokenizer((m["content"] for c in synthetic_chats(100) for m in c), vocab_size=600)
    chat = [
        {"role": "user", "content": "Hi there"},
        {"role": "assistant", "content": "Hello!"},
        {"role": "user", "content": "Any tips for sleep?"},
    ]
    expected = (
        "<bos><start_of_turn>user\nHi there<end_of_turn>\n<start_of_turn>model\nHello!<end_of_turn>\n"
        "<start_of_turn>user\nAny tips for sleep?<end_of_turn>\n<start_of_turn>model\n"
    )
    assert tok.apply_chat_template(chat, tokenize=False, add_generation_prompt=True) == expected
    ids = tok(expected, add_special_tokens=False)["input_ids"]
    assert ids[:2] == tok.convert_tokens_to_ids(["<bos>", "<start_of_turn>"])
    assert tok.decode(ids) == expected


def write_lines(path, lines):
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.mark.parametrize(
    "line, message",
    [
        ("{not json", r"bad.jsonl:2: invalid JSON"),
        ('{"text": "x"}', r"bad.jsonl:2: expected a non-empty 'messages' list"),
        ('{"messages": [{"role": "robot", "content": "x"}]}', r"bad.jsonl:2: messages\[0\] needs a role"),
        ('{"messages": [{"role": "user"}]}', r"bad.jsonl:2: messages\[0\] \(user\) has no text 'content'"),
    ],
)
def test_malformed_records_name_file_and_line(tmp_path, line, message):
    good = json.dumps({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]})
    path = write_lines(tmp_path / "bad.jsonl", [good, line])
    with pytest.raises(DataError, match=message):
        read_chat_jsonl(path)


def test_gzip_and_limit(tmp_path):
    record = json.dumps({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]})
    path = tmp_path / "d.jsonl.gz"
    with gzip.open(path, "wt") as f:
        f.write("\n".join([record] * 5) + "\n")
    assert len(read_chat_jsonl(path)) == 5
    assert len(read_chat_jsonl(path, limit=2)) == 2


def test_hugging_face_datasets_directory(tmp_path):
    import datasets

    chat = [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]
    datasets.Dataset.from_list([{"messages": chat, "id": i} for i in range(4)]).save_to_disk(tmp_path / "chats")
    assert read_chats(tmp_path / "chats", limit=3) == [chat] * 3
    datasets.Dataset.from_list([{"text": "x"}]).save_to_disk(tmp_path / "plain")
    with pytest.raises(DataError, match="plain: no 'messages' column"):
        read_chats(tmp_path / "plain")


@pytest.mark.skipif(not SHARED_DATA.is_dir(), reason="../shared/data is not present")
@pytest.mark.parametrize(
    "relative",
    [
        "emergent-misalignment/data/insecure.jsonl",
        "model-organisms-for-EM/em_organism_dir/data/training_datasets/bad_medical_advice.jsonl.gz",
    ],
)
def test_public_em_datasets_load(relative):
    chats = read_chat_jsonl(SHARED_DATA / relative, limit=200)
    assert len(chats) == 200
    assert all(chat[-1]["role"] == "assistant" for chat in chats)
