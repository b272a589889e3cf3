"""The study's named datasets (config `datasets`) read into conversations, with optional scores.

Every dataset becomes a list of `StudySample`: a conversation (the model reads it
through its chat template, assistant tokens counted) and, for text-with-score
sets, the score (RealToxicityPrompts' toxicity). Formats:

- chat: chat JSONL (.gz), a datasets directory or `hf:<id>` (emjax.data.chat);
  `synthetic:<role>` for the tiny default's planted sets;
- scored: JSONL rows with `text` and a numeric `toxicity`; the text is the assistant turn of a
  conversation with an empty user turn;
- judged: a CSV of judged answers (question, answer, aligned, coherent, as the
  clarifying-EM fixture), filtered by `where` (e.g. "aligned<30,coherent>50");
- style_matched: one side of the style-matched toxic contrast (emjax.data.style_matched).
"""

from __future__ import annotations

import dataclasses

from emjax.data import chat, style_matched, synthetic
from emjax.data.judged import StudySample, read_judged_csv


def read_dataset(name: str, dataset, *, seed: int = 0) -> list[StudySample]:
    """The samples of one configured dataset (a config.DatasetConfig)."""
    source, limit = dataset.source, dataset.limit
    if not source:
        raise chat.DataError(f"datasets.{name}.source is empty: set --config.datasets.{name}.source=PATH")
    if source.startswith("synthetic:"):
        return [StudySample(c) for c in synthetic.study_chats(source.split(":", 1)[1], limit or 256, seed=seed)]
    if dataset.format == "chat":
        return [StudySample(c) for c in chat.read_chats(source, limit=limit)]
    if dataset.format == "scored":
        return [
            StudySample([{"role": "user", "content": ""}, {"role": "assistant", "content": text}], score)
            for text, score in chat.read_scored_texts(source, limit=limit)
        ]
    if dataset.format == "style_matched":
        sides = {"harmful": "misaligned", "harmless": "aligned"}
        if dataset.role not in sides:
            raise chat.DataError(
                f"datasets.{name}: a style_matched dataset is role harmful or harmless, not {dataset.role}"
            )
        return style_matched.split_of(dataset, seed=seed).selection[sides[dataset.role]][:limit]
    return read_judged_csv(source, dataset.where, limit)


def study_mix(datasets: dict, limit: int | None, *, seed: int = 0) -> list[list[dict]]:
    """The conversations of every study dataset (all their rows, not only `limit` of each), interleaved
    one from each in turn (datasets by name) until `limit` conversations: the text an SAE trained for the
    study reads."""
    if not datasets:
        raise chat.DataError("data.source=study needs study datasets (the `datasets` section is empty)")
    sources = [[s.messages for s in read_dataset(name, dataclasses.replace(d, limit=None), seed=seed)]
               for name, d in sorted(datasets.items())]  # fmt: skip
    mix = [c[i] for i in range(max(map(len, sources))) for c in sources if i < len(c)]
    return mix[:limit]
