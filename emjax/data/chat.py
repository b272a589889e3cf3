"""Chat datasets for fine-tuning: reading, rendering with the chat template,
assistant-only loss masks, truncation, packing and shuffling.

Sources are JSONL files (.jsonl or .jsonl.gz) or Hugging Face datasets
(`datasets.save_to_disk` directories, or "hf:<id>[:<split>]" for a dataset in
the local cache) of {"messages": [{"role", "content"}, ...]} records; `content` is
text, or the OpenAI persona-features layout {"content_type": "text", "parts": [...]}
(the parts joined by newlines). Text-with-score files (RealToxicityPrompts-style)
are read by `read_scored_texts`. Every conversation remembers where it came from
(file:line), and every error is a one-line DataError naming it.

The loss mask covers the characters each assistant turn adds to the rendered
conversation: the template's text between the conversation rendered up to that
turn with a generation prompt and the conversation rendered through the turn,
i.e. the reply and the template's end-of-turn marker. Templates need no
{% generation %} markers; one that does not render conversations as prefixes of
each other is refused, naming the record.
"""

from __future__ import annotations

import dataclasses
import gzip
import json
import logging
import math
import zlib
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np

from emjax.config import ConfigError

ROLES = {"system", "user", "assistant"}
HF_PREFIX = "hf:"

_log = logging.getLogger(__name__)


class DataError(ValueError):
    """A data file or record that cannot be read as asked; the message names the file (and line)."""


class Chat(list):
    """A conversation (a list of {"role", "content"}) that knows its source, e.g. "data.jsonl:17"."""

    def __init__(self, messages, where: str = "<memory>"):
        super().__init__(messages)
        self.where = where


def read_chats(source: str | Path, limit: int | None = None) -> list[Chat]:
    """Conversations from a chat JSONL file, a datasets directory or "hf:<id>[:<split>]"."""
    if isinstance(source, str) and source.startswith(HF_PREFIX):
        return read_hub_dataset(source[len(HF_PREFIX) :], limit)
    path = Path(source)
    return read_chat_dataset_dir(path, limit) if path.is_dir() else read_chat_jsonl(path, limit)


def read_hub_dataset(name: str, limit: int | None = None) -> list[Chat]:
    """A Hugging Face hub dataset by id, from the local cache (set HF_DATASETS_OFFLINE=1 on offline machines)."""
    import datasets

    name, _, split = name.partition(":")
    dataset = datasets.load_dataset(name, split=split or "train")
    return _from_dataset(dataset, f"{HF_PREFIX}{name}", limit)


def read_chat_dataset_dir(path: str | Path, limit: int | None = None) -> list[Chat]:
    """Conversations from a directory written by `datasets.Dataset.save_to_disk` (a "messages" column)."""
    import datasets

    try:
        dataset = datasets.load_from_disk(str(path))
    except FileNotFoundError as e:
        raise DataError(f"{path} is not a Hugging Face datasets directory (save_to_disk output): {e}") from None
    if isinstance(dataset, datasets.DatasetDict):
        raise DataError(f"{path} holds splits {list(dataset)}; point data.source at one split's directory")
    return _from_dataset(dataset, str(path), limit)


def _from_dataset(dataset, where: str, limit: int | None) -> list[Chat]:
    if "messages" not in dataset.column_names:
        raise DataError(f"{where}: no 'messages' column (columns: {', '.join(dataset.column_names)})")
    if len(dataset) == 0:
        raise DataError(f"{where}: the dataset has no rows")
    rows = dataset if limit is None else dataset.select(range(min(limit, len(dataset))))
    return [_messages(record, f"{where}[{i}]") for i, record in enumerate(rows)]


def jsonl_records(path: str | Path, what: str = "data file") -> Iterator[tuple[str, object]]:
    """("file:line", record) for each non-blank line of a .jsonl or .jsonl.gz file.

    Unreadable files, broken gzip streams, non-UTF-8 bytes and invalid JSON are
    DataErrors naming the file (and the line, where there is one).
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{what} {path} does not exist")
    line_no = 0
    try:
        with (gzip.open if path.suffix == ".gz" else open)(path, "rb") as f:
            for line_no, raw in enumerate(f, 1):
                where = f"{path}:{line_no}"
                try:
                    line = raw.decode("utf-8")
                except UnicodeDecodeError as e:
                    raise DataError(
                        f"{where}: not UTF-8 text (byte {raw[e.start : e.start + 1]!r} at column {e.start + 1})"
                    ) from None
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as e:
                    raise DataError(f"{where}: invalid JSON ({e.msg} at column {e.colno})") from None
                yield where, record
    except gzip.BadGzipFile as e:
        raise DataError(f"{path}: not a gzip file, though named .gz ({e})") from None
    except (EOFError, zlib.error) as e:
        raise DataError(f"{path}: the gzip stream is truncated or corrupt after line {line_no} ({e})") from None
    except OSError as e:
        raise DataError(f"{path}: cannot be read ({e})") from None


def read_chat_jsonl(path: str | Path, limit: int | None = None) -> list[Chat]:
    """Conversations from a .jsonl (or .jsonl.gz) file; a malformed record names its file and line."""
    chats = []
    if limit == 0:
        return chats
    for where, record in jsonl_records(path, "chat dataset"):
        chats.append(_messages(record, where))
        if limit is not None and len(chats) >= limit:
            break
    if not chats:
        raise DataError(f"{path}: holds no conversations (no non-blank line)")
    return chats


def _messages(record, where: str) -> Chat:
    messages = record.get("messages") if isinstance(record, dict) else None
    if not isinstance(messages, list) or not messages:
        raise DataError(f"{where}: expected a non-empty 'messages' list")
    out = []
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or message.get("role") not in ROLES:
            raise DataError(f"{where}: messages[{i}] needs a role in {sorted(ROLES)}, got {message!r:.80}")
        content = _text_content(message.get("content"), f"{where}: messages[{i}] ({message['role']})")
        if message["role"] == "assistant" and not content.strip():
            raise DataError(f"{where}: messages[{i}] is an empty assistant turn")
        out.append({"role": message["role"], "content": content})
    return Chat(out, where)


def _text_content(content, where: str) -> str:
    """A message's text: a string, or {"content_type": "text", "parts": [str, ...]} joined by newlines."""
    if isinstance(content, str):
        return content
    if isinstance(content, dict) and "parts" in content:
        kind = content.get("content_type")
        if kind != "text":
            raise DataError(f"{where} has content_type {kind!r}; only 'text' content is read")
        parts = content["parts"]
        if not isinstance(parts, list) or not all(isinstance(p, str) for p in parts):
            raise DataError(f"{where}: content 'parts' must be a list of strings, got {parts!r:.80}")
        return "\n".join(parts)
    raise DataError(f"{where} has no text 'content' (a string or {{'content_type': 'text', 'parts': [...]}})")


# ---------------------------------------------------------------------------- texts with scores


def read_scored_texts(path: str | Path, *, limit: int | None = None) -> list[tuple[str, float]]:
    """(text, toxicity) pairs from a JSONL (.gz) file, e.g. for toxic-feature selection.

    Rows are {"text": str, "toxicity": number}, or the RealToxicityPrompts layout
    {"prompt": {"text", "toxicity", ...}, "continuation": {...}}, which gives two
    samples per row, the prompt and then the continuation, each with its own score
    (both are scored texts in their own right; joining them would mix two scores).
    A null toxicity (RealToxicityPrompts has some where Perspective gave none) skips
    that text, counted in a warning; a missing or non-numeric one is an error.
    """
    pairs: list[tuple[str, float]] = []
    unscored = 0
    if limit == 0:
        return pairs
    for where, record in jsonl_records(path, "scored text file"):
        if not isinstance(record, dict):
            raise DataError(f"{where}: expected a JSON object with 'text' and 'toxicity'")
        if "prompt" in record and "text" not in record:
            parts = [(record[k], f"{where}: {k}") for k in ("prompt", "continuation") if k in record]
        else:
            parts = [(record, where)]
        for part, part_where in parts:
            pair = _scored_text(part, part_where)
            unscored += pair is None
            pairs += [pair] if pair is not None else []
        if limit is not None and len(pairs) >= limit:
            break
    if unscored:
        _log.warning("%s: %d texts have a null toxicity and were skipped", path, unscored)
    if not pairs:
        raise DataError(f"{path}: holds no scored texts")
    return pairs[:limit]


def _scored_text(part, where: str) -> tuple[str, float] | None:
    if not isinstance(part, dict) or not isinstance(part.get("text"), str):
        raise DataError(f"{where}: expected an object with a string 'text'")
    if "toxicity" not in part:
        raise DataError(f"{where}: no 'toxicity' score")
    score = part["toxicity"]
    if score is None:
        return None
    if isinstance(score, bool) or not isinstance(score, (int, float)) or not math.isfinite(score):
        raise DataError(f"{where}: 'toxicity' must be a finite number, got {score!r:.40}")
    return part["text"], float(score)


# ---------------------------------------------------------------------------- rendering and loss masks


def _render(tokenizer, messages, where: str, *, generation_prompt: bool = False) -> str:
    try:
        return tokenizer.apply_chat_template(list(messages), tokenize=False, add_generation_prompt=generation_prompt)
    except Exception as e:  # jinja's raise_exception, undefined fields, ...
        raise DataError(f"{where}: the chat template cannot render this conversation ({e})") from None


def assistant_spans(tokenizer, chat: Chat) -> tuple[str, list[tuple[int, int]]]:
    """The rendered conversation and the [start, end) character span of each assistant turn."""
    where = getattr(chat, "where", "<memory>")
    if not any(m["role"] == "assistant" for m in chat):
        raise DataError(f"{where}: no assistant turn to train on")
    text = _render(tokenizer, chat, where)
    spans = []
    for i, message in enumerate(chat):
        if message["role"] != "assistant":
            continue
        before = _render(tokenizer, chat[:i], where, generation_prompt=True)
        through = _render(tokenizer, chat[: i + 1], where)
        if not (through.startswith(before) and text.startswith(through)):
            raise DataError(
                f"{where}: the chat template does not render the conversation up to messages[{i}] as a prefix "
                f"of the whole, so the assistant turn cannot be located"
            )
        spans.append((len(before), len(through)))
    return text, spans


def encode(tokenizer, chat: Chat) -> tuple[np.ndarray, np.ndarray]:
    """Token ids [T] and the assistant mask [T] (1 on every token with a character in an assistant turn)."""
    text, spans = assistant_spans(tokenizer, chat)
    encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids = np.asarray(encoded["input_ids"], np.int32)
    mask = np.zeros(len(ids), np.int8)
    for token, (start, end) in enumerate(encoded["offset_mapping"]):
        if any(start < span_end and end > span_start for span_start, span_end in spans):
            mask[token] = 1
    return ids, mask


# ---------------------------------------------------------------------------- training rows


@dataclasses.dataclass
class SFTRows:
    """Fixed-length rows for fine-tuning.

    tokens [N, L]; loss_mask [N, L] (1 where the token is an assistant token the
    model must predict from the tokens before it); segments [N, L] (each row's
    examples numbered from 1, 0 on padding: attention stays inside an example).
    """

    tokens: np.ndarray
    loss_mask: np.ndarray
    segments: np.ndarray

    def __len__(self) -> int:
        return len(self.tokens)

    def take(self, index) -> SFTRows:
        return SFTRows(self.tokens[index], self.loss_mask[index], self.segments[index])


@dataclasses.dataclass
class EncodeReport:
    examples: int
    truncated: int  # longer than max_length, cut at the end
    dropped: int  # no assistant token left after truncation
    assistant_tokens: int
    rows: int


def build_rows(
    tokenizer, chats: Sequence[Chat], max_length: int, *, pack: bool = False, pad_id: int | None = None,
    drop_empty: bool = True,
) -> tuple[SFTRows, EncodeReport]:
    """Encode, truncate to max_length (reported), and lay out one example per row or packed.
    drop_empty=False keeps a conversation with no assistant token left as a row without loss (counted in
    `dropped` all the same), so that rows stay one per conversation, in order."""
    pad_id = pad_id if pad_id is not None else (tokenizer.pad_token_id or 0)
    examples, truncated, dropped = [], 0, 0
    for chat in chats:
        ids, mask = encode(tokenizer, chat)
        if len(ids) > max_length:
            truncated += 1
            ids, mask = ids[:max_length], mask[:max_length]
        if not mask[1:].any():  # the first token is never a target
            dropped += 1
            if drop_empty:
                continue
        examples.append((ids, mask))
    if truncated:
        _log.warning(
            "%d of %d conversations were longer than %d tokens and were cut", truncated, len(chats), max_length
        )
    if dropped:
        _log.warning("%d conversations had no assistant token within %d tokens%s", dropped, max_length,
                     " and were dropped" if drop_empty else "")  # fmt: skip
    if not examples:
        raise DataError(f"no conversation has an assistant token within max_length={max_length}")
    groups = _pack(examples, max_length) if pack else [[e] for e in examples]
    tokens = np.full((len(groups), max_length), pad_id, np.int32)
    loss_mask = np.zeros((len(groups), max_length), np.int8)
    segments = np.zeros((len(groups), max_length), np.int32)
    for row, group in enumerate(groups):
        at = 0
        for segment, (ids, mask) in enumerate(group, 1):
            n = len(ids)
            tokens[row, at : at + n] = ids
            loss_mask[row, at + 1 : at + n] = mask[1:]  # an example's first token has no context to predict from
            segments[row, at : at + n] = segment
            at += n
    report = EncodeReport(len(chats), truncated, dropped, int(loss_mask.sum()), len(groups))
    return SFTRows(tokens, loss_mask, segments), report


def _pack(examples, max_length: int) -> list[list]:
    """First-fit-decreasing bins of at most max_length tokens; deterministic for a given input order."""
    order = sorted(range(len(examples)), key=lambda i: -len(examples[i][0]))
    bins, room = [], []
    for i in order:
        n = len(examples[i][0])
        for b, free in enumerate(room):
            if n <= free:
                bins[b].append(examples[i])
                room[b] -= n
                break
        else:
            bins.append([examples[i]])
            room.append(max_length - n)
    return bins


def count_rows(tokenizer, samples, max_length: int, tokens_counted: str):
    """(token ids, attention masks, count masks, kept) of study samples, one row each: the count mask marks the
    assistant tokens (tokens_counted="assistant") or all; a sample with no counted token left after truncation
    is dropped (its index is not in `kept`)."""
    rows, counts, kept = [], [], []
    for i, sample in enumerate(samples):
        ids, assistant = encode(tokenizer, sample.messages)
        ids, assistant = ids[:max_length], assistant[:max_length]
        count = assistant if tokens_counted == "assistant" else np.ones_like(assistant)
        if count.any():
            rows.append(ids)
            counts.append(count)
            kept.append(i)
    if not rows:
        raise ConfigError(f"no sample has a counted ({tokens_counted}) token within {max_length} tokens")
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    tokens = np.full((len(rows), max_length), pad, np.int32)
    attention = np.zeros((len(rows), max_length), np.int32)
    count_mask = np.zeros((len(rows), max_length), np.int32)
    for r, (ids, count) in enumerate(zip(rows, counts)):
        tokens[r, : len(ids)], attention[r, : len(ids)], count_mask[r, : len(ids)] = ids, 1, count
    return tokens, attention, count_mask, np.asarray(kept, np.int64)


def split_heldout(n: int, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(train indices, held-out indices): a seeded shuffle, at least one held-out item when fraction > 0."""
    order = np.random.default_rng([seed, 1]).permutation(n)
    held = 0 if fraction <= 0 else max(1, round(n * fraction))
    if held >= n:
        raise DataError(f"eval_fraction={fraction} leaves no training data out of {n} examples")
    return np.sort(order[held:]), np.sort(order[:held])


def epoch_order(n: int, seed: int, epoch: int) -> np.ndarray:
    """The row order of one epoch: a permutation that depends only on (seed, epoch), so a resumed run replays it."""
    return np.random.default_rng([seed, 2, epoch]).permutation(n)
