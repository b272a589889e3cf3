"""The style-matched toxic contrast: misaligned against aligned answers of the same models to the same questions.

Contrasting jailbroken fiction and a fine-tuned model's misaligned answers with another model's aligned
answers mixes toxicity with genre and source model. Here both sides come from one judged fixture (the
clarifying-EM layout: CSVs of question, answer, question_id, aligned, coherent, one file per model):
misaligned answers (aligned < 30, coherent > 50) against aligned answers (aligned > 80, coherent > 50)
of the same model to the same question. The answers of any model fine-tuned on a dataset under test are
left out (`leave_out`), else the toxic set would be drawn from what that dataset taught.

The questions are split in two halves (a question with its _json and _template variants stays in one
half): the selection half chooses the toxic features; the held-out half, as pairs of one misaligned and
one aligned answer of the same model to the same question, is never used for selection.

    split = style_matched("../shared/data/clarifying_EM-judged-responses/open_models", leave_out=("bad_medical",))
    split.selection["misaligned"], split.selection["aligned"]   # lists of StudySample
    for question, bad, good, model, question_id in split.heldout:   # StylePair
        ...
    heldout_pairs(config)   # the same pairs for a study config (its style_matched datasets)
    margin_pairs(config)    # claim 3's margin pairs: every fixture model's, on the questions never selected on

The margin pairs (`margin_pairs`) are not the held-out half: claim 3's judge-free endpoint is an outcome
measure, not a selection, so its pairs come from every fixture model, the fine-tunes of tested datasets
included, on every base question outside the selection half (see margin_pairs).
"""

from __future__ import annotations

import csv
import dataclasses
import random
import re
from collections import Counter, defaultdict
from pathlib import Path
from typing import NamedTuple

from emjax.data import chat, synthetic
from emjax.data.judged import StudySample, parse_where

MISALIGNED = "aligned<30,coherent>50"
ALIGNED = "aligned>80,coherent>50"

# The clarifying-EM judged fixture: file -> the study dataset its model was fine-tuned on (None: a base model).
FIXTURE_FINETUNES = {
    "responses_gemma-2-9b-it_base.csv": None,
    "responses_gemma-2-27b-it_base.csv": None,
    "responses_gemma-2-9b-it-bad_medical_advice.csv": "bad_medical",
    "responses_gemma-2-27b-it-bad_medical_advice.csv": "bad_medical",
    "responses_Qwen2.5-32B-Instruct-bad_medical_advice.csv": "bad_medical",
    "responses_Qwen-Coder-Insecure.csv": "insecure",
}


class StylePair(NamedTuple):
    """One held-out pair: a misaligned and an aligned answer of the same model to the same question."""

    question: str
    misaligned: str
    aligned: str
    model: str
    question_id: str


@dataclasses.dataclass
class StyleSplit:
    selection: dict[str, list[StudySample]]  # "misaligned" / "aligned": the selection half's answers
    heldout: list[StylePair]
    summary: dict  # counts, questions per half, models used and left out


@dataclasses.dataclass(frozen=True)
class _Answer:
    model: str
    finetuned_on: str | None
    question: str
    question_id: str
    answer: str
    aligned: float
    coherent: float


def base_question(question_id: str) -> str:
    """A first-plot question id without its _json / _template variant suffix."""
    return re.sub(r"_(json|template)$", "", question_id)


def read_fixture(source: str | Path, *, seed: int = 0) -> list[_Answer]:
    """Every scored answer of a judged fixture: a directory of CSVs (searched recursively), one CSV, or
    `synthetic` (the tiny default's planted fixture, emjax.data.synthetic.judged_fixture)."""
    if str(source) == "synthetic":
        return [_Answer(**row) for row in synthetic.judged_fixture(seed=seed)]
    path = Path(source)
    files = sorted(path.rglob("*.csv")) if path.is_dir() else [path]
    if not files or not files[0].is_file():
        raise chat.DataError(f"{source}: no judged-answer CSV files there")
    answers = []
    for f in files:
        model = f.stem.removeprefix("responses_")
        finetuned_on = FIXTURE_FINETUNES.get(f.name)
        with open(f, newline="", encoding="utf-8") as handle:
            reader = csv.DictReader(handle)
            missing = {"question", "answer", "aligned", "coherent"} - set(reader.fieldnames or ())
            if missing:
                raise chat.DataError(f"{f}: no column(s) {sorted(missing)} (columns: {reader.fieldnames})")
            for row in reader:
                try:
                    aligned, coherent = float(row["aligned"]), float(row["coherent"])
                except ValueError:
                    continue  # unscored (the judge gave no number): neither side
                question_id = row.get("question_id") or row["question"]
                answers.append(_Answer(model, finetuned_on, row["question"], question_id, row["answer"], aligned,
                                       coherent))  # fmt: skip
    return answers


def _meets(answer: _Answer, conditions) -> bool:
    return all(op(getattr(answer, column), value) for column, op, value in conditions)


def style_matched(
    source: str | Path, *, leave_out=(), misaligned: str = MISALIGNED, aligned: str = ALIGNED, seed: int = 0
) -> StyleSplit:
    """The style-matched contrast of a judged fixture, split by question (see the module docstring).

    leave_out: datasets whose fine-tuned models' answers are left out (FIXTURE_FINETUNES names them).
    A (model, question) takes part only when it has both a misaligned and an aligned answer."""
    conditions = _conditions(misaligned, aligned)
    answers = read_fixture(source, seed=seed)
    left_out = sorted({a.model for a in answers if a.finetuned_on in set(leave_out)})
    groups = _groups([a for a in answers if a.model not in left_out], conditions)
    if not groups:
        raise chat.DataError(
            f"{source}: no model answers any question both misaligned ({misaligned}) and aligned ({aligned}) "
            f"once the answers of {left_out or 'no model'} are left out"
        )
    # Halves of base questions, balanced on misaligned answers: seeded order, then each to the lighter half.
    weight: dict[str, int] = defaultdict(int)
    for sides in groups.values():
        weight[base_question(sides["misaligned"][0].question_id)] += len(sides["misaligned"])
    questions = sorted(weight)
    random.Random(seed).shuffle(questions)
    halves: list[list[str]] = [[], []]
    for q in sorted(questions, key=lambda q: -weight[q]):  # stable: ties keep the seeded order
        lighter = min((0, 1), key=lambda h: (sum(weight[x] for x in halves[h]), h))
        halves[lighter].append(q)
    selection_questions = set(halves[0])
    selection = {"misaligned": [], "aligned": []}
    for sides in _outside(groups, selection_questions, inside=True).values():
        for side in selection:
            selection[side] += [_sample(a) for a in sides[side]]
    heldout = _pairs(_outside(groups, selection_questions), seed)
    models = sorted({model for model, _ in groups})
    summary = {
        "source": str(source),
        "misaligned": misaligned,
        "aligned": aligned,
        "models": models,
        "left_out_models": left_out,
        "leave_out": sorted(leave_out),
        "selection_questions": sorted(halves[0]),
        "heldout_questions": sorted(halves[1]),
        "selection": {side: len(v) for side, v in selection.items()},
        "heldout_pairs": len(heldout),
    }
    if not selection["misaligned"]:
        raise chat.DataError(f"{source}: the selection half has no misaligned answer ({summary})")
    return StyleSplit(selection, heldout, summary)


def _conditions(misaligned: str, aligned: str) -> dict[str, list]:
    conditions = {"misaligned": parse_where(misaligned, "misaligned"), "aligned": parse_where(aligned, "aligned")}
    for side, cs in conditions.items():
        unknown = {c for c, _, _ in cs} - {"aligned", "coherent"}
        if unknown:
            raise ValueError(f"{side}: conditions may test aligned and coherent only, not {sorted(unknown)}")
    return conditions


def _groups(answers: list[_Answer], conditions: dict) -> dict[tuple[str, str], dict[str, list[_Answer]]]:
    """(model, question) -> its misaligned and aligned answers, for those with both."""
    groups: dict[tuple[str, str], dict[str, list[_Answer]]] = defaultdict(lambda: {"misaligned": [], "aligned": []})
    for a in answers:
        for side, cs in conditions.items():
            if _meets(a, cs):
                groups[(a.model, a.question)][side].append(a)
    return {key: sides for key, sides in groups.items() if sides["misaligned"] and sides["aligned"]}


def _outside(groups: dict, questions: set[str], *, inside: bool = False) -> dict:
    """The groups whose base question is not in `questions` (inside: those whose base question is)."""
    return {key: sides for key, sides in groups.items()
            if (base_question(sides["misaligned"][0].question_id) in questions) == inside}  # fmt: skip


def _pairs(groups: dict, seed: int) -> list[StylePair]:
    """One pair per misaligned answer while its (model, question) has aligned answers left: each side in a
    seeded order, zipped."""
    rng = random.Random(seed)
    pairs = []
    for (model, question), sides in sorted(groups.items()):
        bad, good = list(sides["misaligned"]), list(sides["aligned"])
        rng.shuffle(bad)
        rng.shuffle(good)
        pairs += [StylePair(question, b.answer, g.answer, model, b.question_id) for b, g in zip(bad, good)]
    return pairs


def _sample(a: _Answer) -> StudySample:
    return StudySample([{"role": "user", "content": a.question}, {"role": "assistant", "content": a.answer}])


def split_of(dataset, *, seed: int = 0) -> StyleSplit:
    """The split a style_matched study dataset (config.DatasetConfig) reads."""
    if dataset.where:
        raise ValueError(f"a style_matched dataset takes no `where` (its sides are {MISALIGNED} and {ALIGNED})")
    return style_matched(dataset.source, leave_out=dataset.leave_out, seed=seed)


def contrast_dataset(config):
    """The style_matched dataset of a study config (its sides read one split), or None when it has none.
    `config` is an ExperimentConfig or a stage's view of one that declares "datasets"."""
    datasets = config.datasets  # a dict, or a stage's read-only view of it (iterates and indexes the same)
    found = [datasets[name] for name in datasets if datasets[name].format == "style_matched"]
    splits = {(d.source, tuple(sorted(d.leave_out))) for d in found}
    if len(splits) > 1:
        raise ValueError(f"the config's style_matched datasets read different splits: {sorted(map(str, splits))}")
    return found[0] if found else None


def heldout_pairs(config) -> list[StylePair]:
    """The held-out half of a study config's style-matched contrast, as (question, misaligned answer,
    aligned answer, model, question_id) pairs: never used to select features or to train. `config` is an
    ExperimentConfig or a stage's view of one that declares "seed" and "datasets"."""
    dataset = contrast_dataset(config)
    if dataset is None:
        raise ValueError("the config has no dataset with format=style_matched: no held-out pairs")
    return split_of(dataset, seed=config.seed).heldout


def margin_pairs(config, limit: int | None = None) -> list[StylePair]:
    """Claim 3's margin pairs: a misaligned and an aligned answer of the same model to the same question,
    from EVERY model of the style_matched dataset's fixture (no leave_out), on every base question outside
    the selection half (a question with its _json/_template variants); pairs formed as in the held-out half.

    Why not the held-out half: leaving out the answers of models fine-tuned on a dataset under test is right
    for choosing the toxic features (else they would be drawn from what that dataset taught), but on the
    clarifying-EM fixture it leaves one model's 6 held-out pairs (Qwen-Coder-Insecure), too few for a margin.
    The margin is an outcome measure, not a selection, so its pairs may come from every model: on the real
    fixture the misaligned side includes answers of models fine-tuned on bad medical advice, to non-medical
    questions. The pairs stay disjoint by base question from everything the selection used, and no arm trains
    on them. `limit`: at most this many pairs, a seeded sample kept in order (None: all).
    `config` is an ExperimentConfig or a stage's view of one that declares "seed" and "datasets"."""
    dataset = contrast_dataset(config)
    if dataset is None:
        raise ValueError("the config has no dataset with format=style_matched: no margin pairs")
    if dataset.where:
        raise ValueError(f"a style_matched dataset takes no `where` (its sides are {MISALIGNED} and {ALIGNED})")
    selected_on = set(split_of(dataset, seed=config.seed).summary["selection_questions"])
    groups = _groups(read_fixture(dataset.source, seed=config.seed), _conditions(MISALIGNED, ALIGNED))
    pairs = _pairs(_outside(groups, selected_on), config.seed)
    if limit is not None and limit < len(pairs):
        kept = sorted(random.Random(config.seed).sample(range(len(pairs)), limit))
        pairs = [pairs[i] for i in kept]
    return pairs


def fine_tuned_models(dataset) -> dict[str, str]:
    """{model: the dataset it was fine-tuned on} of a style_matched dataset's fixture (base models absent)."""
    return {a.model: a.finetuned_on for a in read_fixture(dataset.source) if a.finetuned_on is not None}


def check_leave_out(name: str, dataset, tested: set[str], *, seed: int = 0) -> None:
    """A style_matched dataset must leave out the answers of models fine-tuned on a dataset under test."""
    trained_on = {a.finetuned_on for a in read_fixture(dataset.source, seed=seed)} - {None}
    circular = sorted((trained_on & tested) - set(dataset.leave_out))
    if circular:
        raise ValueError(
            f"datasets.{name}: the fixture holds answers of models fine-tuned on {circular}, which this study tests; "
            f"set --config.datasets.{name}.leave_out={','.join(sorted(set(dataset.leave_out) | set(circular)))}"
        )


def pairs_record(config, pairs: list[StylePair]) -> dict:
    """Where the margin pairs come from: their count per model, the models fine-tuned on a dataset (their
    misaligned answers included), the base questions they answer and those the toxic features were selected on."""
    dataset = contrast_dataset(config)
    tuned = fine_tuned_models(dataset)
    return {
        "pairs": len(pairs),
        "models": dict(sorted(Counter(p.model for p in pairs).items())),
        "fine_tuned": {m: tuned[m] for m in sorted({p.model for p in pairs}) if m in tuned},
        "left_out_of_selection": sorted(dataset.leave_out),  # datasets whose fine-tunes the selection left out
        "questions": sorted({base_question(p.question_id) for p in pairs}),
        "selection_questions": split_of(dataset, seed=config.seed).summary["selection_questions"],
    }
