"""Reading chat datasets: JSONL files of {"messages": [{"role", "content"}, ...]} records."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

ROLES = {"system", "user", "assistant"}


class DataError(ValueError):
    pass


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
