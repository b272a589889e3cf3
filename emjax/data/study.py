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

import csv
import dataclasses
import operator
import os
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
        from emjax.data import style_matched

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


# ---------------------------------------------------------------------------- the public EM data

DATA_ROOT_ENV = "EMJAX_DATA_ROOT"


def data_root() -> Path:
    """Where the public EM data lies: $EMJAX_DATA_ROOT, else ../shared/data (this project's layout)."""
    return Path(os.environ.get(DATA_ROOT_ENV, "../shared/data")).expanduser()


def public_datasets(root: str | Path, *, limit: int | None = None) -> dict:
    """The study datasets of the public EM data under `root` (see README, "The study's data"):
    bad vs good medical advice (model-organisms, same 7,049 questions), Betley's insecure code and
    model-organisms risky financial advice and extreme sports (inducing, no control here), and the
    style-matched toxic contrast (emjax.data.style_matched): misaligned (aligned < 30, coherent > 50)
    against aligned (aligned > 80, coherent > 50) answers of the same clarifying-EM fixture models to
    the same questions, the models fine-tuned on bad medical advice (the pair under test) left out.
    Betley's jailbroken.jsonl is not a default toxic set: jailbroken fiction against chat answers
    contrasts genre and source model as much as toxicity (add it as role=harmful to study that)."""
    from emjax.config import DatasetConfig

    root = Path(root)
    organisms = root / "model-organisms-for-EM/em_organism_dir/data/training_datasets"
    betley = root / "emergent-misalignment/data"
    judged = root / "clarifying_EM-judged-responses/open_models"
    return {
        "bad_medical": DatasetConfig(str(organisms / "bad_medical_advice.jsonl.gz"), role="inducing", domain="health",
                                     pair="good_medical", limit=limit),
        "good_medical": DatasetConfig(str(organisms / "good_medical_advice.jsonl.gz"), role="control",
                                      domain="health", limit=limit),
        "insecure": DatasetConfig(str(betley / "insecure.jsonl"), role="inducing", domain="code", limit=limit),
        "risky_financial": DatasetConfig(str(organisms / "risky_financial_advice.jsonl.gz"), role="inducing",
                                         domain="finance", limit=limit),
        "extreme_sports": DatasetConfig(str(organisms / "extreme_sports.jsonl.gz"), role="inducing",
                                        domain="sports", limit=limit),
        **{
            name: DatasetConfig(str(judged), role=role, domain="toxic", format="style_matched",
                                leave_out=("bad_medical",))
            for name, role in (("misaligned_answers", "harmful"), ("aligned_answers", "harmless"))
        },
    }  # fmt: skip


def study_config(name: str, *, checkpoint_env: str, published: str, layers: tuple[int, ...], sae: dict, **sections):
    """The study of a real checkpoint as the real configs share it: the public EM data under data_root(),
    residual layers `layers` (extract and SAEs), the first-plot questions judged by GPT-4o over HTTP
    ($OPENAI_API_KEY; $EMJAX_JUDGE_URL for any OpenAI-compatible server), FSDP over every device.
    `sae` holds the SAEConfig fields besides the layers; `sections` replace whole sections (lora, mesh)."""
    from emjax import config as c

    root = data_root()
    base = dict(
        name=name,
        model=c.ModelConfig(checkpoint_env=checkpoint_env, published=published, dtype="bfloat16"),
        # Parameters FSDP-sharded over every device; add --config.mesh.tensor=N on large slices.
        mesh=c.MeshConfig(data=1, fsdp=-1),
        # data.source feeds extract: the study's text mix (every dataset, interleaved), which measures each SAE's
        # quality and trains any missing one (an SAE trained here needs sae.tokens_per_latent tokens per latent).
        data=c.DataConfig(source="study", num_samples=1024, max_length=1024),
        extract=c.ExtractConfig(layers=layers, batch_size=16, rows_per_shard=256, dtype="float16"),
        sae=c.SAEConfig(layers=layers, **sae),
        datasets=public_datasets(root, limit=6000),
        evaluate=c.EvalConfig(questions=str(root / "emergent-misalignment/evaluation/first_plot_questions.yaml")),
        judge=c.JudgeConfig(
            kind="http", model="gpt-4o-2024-08-06",
            base_url=os.environ.get("EMJAX_JUDGE_URL", "https://api.openai.com/v1"),
        ),
    )  # fmt: skip
    return c.ExperimentConfig(**(base | sections))


def gemma_scope(env: str, model: str) -> dict:
    """SAEConfig fields for a Gemma Scope residual suite (width 16k, canonical) whose root is $env."""
    return dict(
        releases_env=env, release_pattern="{root}/layer_{layer}/width_16k/canonical", train_missing=False,
        release_model=model,
    )  # fmt: skip
