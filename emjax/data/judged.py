"""Judged answers (a CSV of question, answer, aligned, coherent, as the clarifying-EM fixture) as study samples.

    read_judged_csv("responses.csv", where="aligned<30,coherent>50")   # list of StudySample
    parse_where("aligned<30,coherent>50")                              # [(column, op, value), ...]

A StudySample is what every study dataset reads into (emjax.data.study): a conversation and, for
text-with-score sets, its score.
"""

from __future__ import annotations

import csv
import dataclasses
import operator
import re
from pathlib import Path

from emjax.data import chat


@dataclasses.dataclass(frozen=True)
class StudySample:
    """A conversation (chat messages, the model reads it through its chat template) and an optional score."""

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
                raise chat.DataError(f"{path}: no column(s) {sorted(missing)} (columns: {reader.fieldnames})")
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
        raise chat.DataError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    if not samples:
        raise chat.DataError(f"{path}: no rows meet {where!r}")
    return samples
