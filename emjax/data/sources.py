"""Reading chat datasets: JSONL files, or `datasets.save_to_disk` directories, of
{"messages": [{"role", "content"}, ...]} records."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

ROLES = {"system", "user", "assistant"}


class DataError(ValueError):
    pass


def read_chats(source: str | Path, limit: int | None = None) -> list[list[dict[str, str]]]:
    """Conversations from a chat JSONL file or a Hugging Face datasets directory."""
    path = Path(source)
    return read_chat_dataset_dir(path, limit) if path.is_dir() else read_chat_jsonl(path, limit)


def read_chat_dataset_dir(path: str | Path, limit: int | None = None) -> list[list[dict[str, str]]]:
    """Conversations from a directory written by `datasets.Dataset.save_to_disk` (a "messages" column)."""
    import datasets

    try:
        dataset = datasets.load_from_disk(str(path))
    except FileNotFoundError as e:
        raise DataError(f"{path} is not a Hugging Face datasets directory (save_to_disk output): {e}") from None
    if isinstance(dataset, datasets.DatasetDict):
        raise DataError(f"{path} holds splits {list(dataset)}; point data.source at one split's directory")
    if "messages" not in dataset.column_names:
        raise DataError(f"{path}: no 'messages' column (columns: {', '.join(dataset.column_names)})")
    rows = dataset if limit is None else dataset.select(range(min(limit, len(dataset))))
    return [_messages(record, f"{path}[{i}]") for i, record in enumerate(rows)]


def read_chat_jsonl(path: str | Path, limit: int | None = None) -> list[list[dict[str, str]]]:
    """Conversations from a .jsonl (or .jsonl.gz) file; a malformed record names its file and line."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"chat dataset {path} does not exist")
    opener = gzip.open if path.suffix == ".gz" else open
    chats = []
    with opener(path, "rt", encoding="utf-8") as f:
        for line_no, line in enumerate(f, 1):
            if limit is not None and len(chats) >= limit:
                break
            if not line.strip():
                continue
            where = f"{path}:{line_no}"
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{where}: invalid JSON ({e.msg} at column {e.colno})") from None
            chats.append(_messages(record, where))
    return chats


def _messages(record, where: str) -> list[dict[str, str]]:
    messages = record.get("messages") if isinstance(record, dict) else None
    if not isinstance(messages, list) or not messages:
        raise DataError(f"{where}: expected a non-empty 'messages' list")
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or message.get("role") not in ROLES:
            raise DataError(f"{where}: messages[{i}] needs a role in {sorted(ROLES)}, got {message!r:.80}")
        if not isinstance(message.get("content"), str):
            raise DataError(f"{where}: messages[{i}] ({message['role']}) has no text 'content'")
    return [{"role": m["role"], "content": m["content"]} for m in messages]
