"""The study's named datasets (config `datasets`) read into conversations, with optional scores.

Every dataset becomes a list of `StudySample`: a conversation (the model reads it
through its chat template, assistant tokens counted) and, for text-with-score
sets, the score (RealToxicityPrompts' toxicity). Formats:

- chat: chat JSONL (.gz), a datasets directory or `hf:<id>` (emjax.data.chat);
  `synthetic:<role>` for the tiny default's planted sets;
- scored: JSONL rows with `text` and a numeric `toxicity`; the text is the assistant turn of a
  conversation with an empty user turn;
- judged: a CSV of judged answers (question, answer, aligned, coherent, as the
  clarifying-EM fixture), filtered by `where` (e.g. "aligned<30,coherent>50").
"""

from __future__ import annotations

import csv
import dataclasses
import operator
import re
from pathlib import Path

from emjax.data import chat, synthetic


@dataclasses.dataclass(frozen=True)
class StudySample:
    messages: list
    score: float | None = None


_OPS = {"<": operator.lt, "<=": operator.le, ">": operator.gt, ">=": operator.ge, "==": operator.eq}
_CONDITION = re.compile(r"^\s*(\w+)\s*(<=|>=|==|<|>)\s*(-?[\d.]+)\s*$")


def parse_where(where: str | None, what: str = "where") -> list[tuple[str, callable, float]]:
    """'aligned<30,coherent>50' -> [(column, op, value), ...]."""
    conditions = []
    for part in (where or "").split(","):
        if not part.strip():
            continue
        m = _CONDITION.match(part)
        if not m:
            raise ValueError(f"{what}: cannot parse {part!r}; write conditions like aligned<30,coherent>50")
        conditions.append((m[1], _OPS[m[2]], float(m[3])))
    return conditions


def read_judged_csv(path: str | Path, where: str | None = None, limit: int | None = None) -> list[StudySample]:
    """Answers of a judged-responses CSV whose scores meet `where`; rows without a score are left out."""
    path = Path(path)
    conditions = parse_where(where, f"{path}: where")
    try:
        with open(path, newline="", encoding="utf-8") as f:
            reader = csv.DictReader(f)
            missing = {"question", "answer"} - set(reader.fieldnames or ())
            missing |= {c for c, _, _ in conditions} - set(reader.fieldnames or ())
            if missing:
                raise ValueError(f"{path}: no column(s) {sorted(missing)} (columns: {reader.fieldnames})")
            samples = []
            for row in reader:
                try:
                    keep = all(op(float(row[c]), v) for c, op, v in conditions)
                except ValueError:
                    continue  # an unscored answer (empty or non-numeric cell) meets no condition
                if keep:
                    messages = [
                        {"role": "user", "content": row["question"]},
                        {"role": "assistant", "content": row["answer"]},
                    ]
                    samples.append(StudySample(messages))
                if limit is not None and len(samples) >= limit:
                    break
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    if not samples:
        raise ValueError(f"{path}: no rows meet {where!r}")
    return samples


def read_dataset(name: str, dataset, *, seed: int = 0) -> list[StudySample]:
    """The samples of one configured dataset (a config.DatasetConfig)."""
    source, limit = dataset.source, dataset.limit
    if not source:
        raise ValueError(f"datasets.{name}.source is empty: set --config.datasets.{name}.source=PATH")
    if source.startswith("synthetic:"):
        return [StudySample(c) for c in synthetic.study_chats(source.split(":", 1)[1], limit or 256, seed=seed)]
    if dataset.format == "chat":
        return [StudySample(c) for c in chat.read_chats(source, limit=limit)]
    if dataset.format == "scored":
        return [
            StudySample([{"role": "user", "content": ""}, {"role": "assistant", "content": text}], score)
            for text, score in chat.read_scored_texts(source, limit=limit)
        ]
    return read_judged_csv(source, dataset.where, limit)
