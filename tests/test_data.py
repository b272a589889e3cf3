"""Chat sources, the synthetic corpus and the trained chat tokenizer."""

import gzip
import json
from pathlib import Path

import pytest

from emjax.data.chat import DataError, read_chat_jsonl, read_chats, read_scored_texts
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


GOOD = json.dumps({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]})


def test_empty_chat_files_and_datasets_name_themselves(tmp_path):
    (tmp_path / "empty.jsonl").write_text("")
    with pytest.raises(DataError, match=r"empty\.jsonl: holds no conversations"):
        read_chats(tmp_path / "empty.jsonl")
    write_lines(tmp_path / "blank.jsonl", ["", "  "])
    with pytest.raises(DataError, match=r"blank\.jsonl: holds no conversations"):
        read_chats(tmp_path / "blank.jsonl")
    import datasets

    from emjax.data.chat import _from_dataset

    no_rows = datasets.Dataset.from_list([json.loads(GOOD)]).select([])  # datasets cannot save an empty one
    with pytest.raises(DataError, match=r"hf:some/set: the dataset has no rows"):
        _from_dataset(no_rows, "hf:some/set", None)


def test_broken_gzip_files_name_themselves(tmp_path):
    plain = write_lines(tmp_path / "plain.jsonl.gz", [GOOD])  # named .gz, not compressed
    with pytest.raises(DataError, match=r"plain\.jsonl\.gz: not a gzip file"):
        read_chats(plain)
    whole = gzip.compress(("\n".join([GOOD] * 200) + "\n").encode())
    (tmp_path / "cut.jsonl.gz").write_bytes(whole[: len(whole) // 2])
    with pytest.raises(DataError, match=r"cut\.jsonl\.gz: the gzip stream is truncated or corrupt after line \d+"):
        read_chats(tmp_path / "cut.jsonl.gz")


def test_non_utf8_bytes_name_file_and_line(tmp_path):
    path = tmp_path / "latin1.jsonl"
    path.write_bytes((GOOD + "\n").encode() + '{"messages": "caf\xe9"}\n'.encode("latin-1"))
    with pytest.raises(DataError, match=r"latin1\.jsonl:2: not UTF-8 text \(byte b'\\xe9' at column 18\)"):
        read_chats(path)


def test_openai_parts_content_is_joined_and_other_content_types_refused(tmp_path):
    def parts(*texts, kind="text"):
        return {"content_type": kind, "parts": list(texts)}

    record = {
        "messages": [{"role": "user", "content": parts("q1", "q2")}, {"role": "assistant", "content": parts("a")}]
    }
    (chat,) = read_chats(write_lines(tmp_path / "persona.jsonl", [json.dumps(record)]))
    assert chat == [{"role": "user", "content": "q1\nq2"}, {"role": "assistant", "content": "a"}]
    record["messages"][1]["content"] = parts("print(1)", kind="code")
    with pytest.raises(DataError, match=r"persona\.jsonl:2: messages\[1\] \(assistant\) has content_type 'code'"):
        read_chats(write_lines(tmp_path / "persona.jsonl", [GOOD, json.dumps(record)]))
    record["messages"][1]["content"] = parts("a", 3)
    with pytest.raises(DataError, match=r"persona\.jsonl:1: messages\[1\] \(assistant\): content 'parts' must be"):
        read_chats(write_lines(tmp_path / "persona.jsonl", [json.dumps(record)]))


def test_scored_texts_flat_and_real_toxicity_prompts_layouts(tmp_path):
    flat = [{"text": "you fool", "toxicity": 0.91}, {"text": "hello", "toxicity": 0}, {"text": "x", "toxicity": None}]
    path = write_lines(tmp_path / "scored.jsonl", [json.dumps(r) for r in flat])
    assert read_scored_texts(path) == [("you fool", 0.91), ("hello", 0.0)]
    assert read_scored_texts(path, limit=1) == [("you fool", 0.91)]
    rtp = {
        "filename": "0.txt",
        "prompt": {"text": "So I said", "toxicity": 0.1, "insult": 0.05},
        "continuation": {"text": " go away", "toxicity": 0.4},
    }
    gz = tmp_path / "rtp.jsonl.gz"
    gz.write_bytes(gzip.compress((json.dumps(rtp) + "\n").encode()))
    assert read_scored_texts(gz) == [("So I said", 0.1), (" go away", 0.4)]


@pytest.mark.parametrize(
    "line, message",
    [
        ('{"text": "a"}', r"s\.jsonl:2: no 'toxicity' score"),
        ('{"text": "a", "toxicity": "high"}', r"s\.jsonl:2: 'toxicity' must be a finite number, got 'high'"),
        ('{"text": "a", "toxicity": NaN}', r"s\.jsonl:2: 'toxicity' must be a finite number"),
        ('{"toxicity": 0.5}', r"s\.jsonl:2: expected an object with a string 'text'"),
        ('{"prompt": {"text": "a", "toxicity": 0.1}, "continuation": {"text": "b"}}', r"s\.jsonl:2: continuation: no"),
        ("[1, 2]", r"s\.jsonl:2: expected a JSON object"),
        ("{oops", r"s\.jsonl:2: invalid JSON"),
    ],
)
def test_bad_scored_texts_name_file_and_line(tmp_path, line, message):
    path = write_lines(tmp_path / "s.jsonl", ['{"text": "fine", "toxicity": 0.2}', line])
    with pytest.raises(DataError, match=message):
        read_scored_texts(path)


def test_an_empty_scored_text_file_is_refused(tmp_path):
    (tmp_path / "s.jsonl").write_text("\n")
    with pytest.raises(DataError, match=r"s\.jsonl: holds no scored texts"):
        read_scored_texts(tmp_path / "s.jsonl")


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
