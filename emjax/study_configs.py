"""The whole-experiment configs the real-checkpoint studies share (configs/*.py build from these).

    public_datasets(data_root())            # the study datasets of the public EM data
    study_config("gemma2_2b", checkpoint_env="EMJAX_GEMMA2_2B", published="gemma-2-2b", layers=(6, 12, 18),
                 sae=gemma_scope("EMJAX_GEMMA_SCOPE_2B", "google/gemma-2-2b"))

The datasets are read by emjax.data; what an experiment runs on (which files, which model, judge and
mesh) is configuration, so it sits here, above emjax.config, and not among the readers.
"""

from __future__ import annotations

import os
from pathlib import Path

from emjax import config as c

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
    root = Path(root)
    organisms = root / "model-organisms-for-EM/em_organism_dir/data/training_datasets"
    betley = root / "emergent-misalignment/data"
    judged = root / "clarifying_EM-judged-responses/open_models"
    return {
        "bad_medical": c.DatasetConfig(str(organisms / "bad_medical_advice.jsonl.gz"), role="inducing", domain="health",
                                     pair="good_medical", limit=limit),
        "good_medical": c.DatasetConfig(str(organisms / "good_medical_advice.jsonl.gz"), role="control",
                                      domain="health", limit=limit),
        "insecure": c.DatasetConfig(str(betley / "insecure.jsonl"), role="inducing", domain="code", limit=limit),
        "risky_financial": c.DatasetConfig(str(organisms / "risky_financial_advice.jsonl.gz"), role="inducing",
                                         domain="finance", limit=limit),
        "extreme_sports": c.DatasetConfig(str(organisms / "extreme_sports.jsonl.gz"), role="inducing",
                                        domain="sports", limit=limit),
        **{
            name: c.DatasetConfig(str(judged), role=role, domain="toxic", format="style_matched",
                                leave_out=("bad_medical",))
            for name, role in (("misaligned_answers", "harmful"), ("aligned_answers", "harmless"))
        },
    }  # fmt: skip


def study_config(name: str, *, checkpoint_env: str, published: str, layers: tuple[int, ...], sae: dict, **sections):
    """The study of a real checkpoint as the real configs share it: the public EM data under data_root(),
    residual layers `layers` (extract and SAEs), the first-plot questions judged by GPT-4o over HTTP
    ($OPENAI_API_KEY; $EMJAX_JUDGE_URL for any OpenAI-compatible server), FSDP over every device.
    `sae` holds the SAEConfig fields besides the layers; `sections` replace whole sections (lora, mesh)."""
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
