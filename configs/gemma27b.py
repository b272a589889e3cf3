"""Gemma-2-27B: the paper's main family. Point $EMJAX_GEMMA2_27B (or --config.model.checkpoint) at a
local Hugging Face checkpoint directory (config.json, *.safetensors, tokenizer files); nothing is
downloaded.

The study (python -m emjax.main --config=gemma27b): the public EM datasets under $EMJAX_DATA_ROOT
(default ../shared/data; see emjax.data.study.public_datasets), Gemma Scope residual SAEs (width
16k, canonical) from the suite at $EMJAX_GEMMA_SCOPE_27B (gemma-scope-27b-pt-res-canonical),
residual layers (10, 22, 34); LoRA fine-tunes with the reference recipe (rank 32, alpha 64, rsLoRA,
lr 1e-5, one epoch); the 8 first-plot questions x 100 answers judged by GPT-4o (judge.kind=http,
$OPENAI_API_KEY; $EMJAX_JUDGE_URL for any OpenAI-compatible server).
"""

import os

from emjax.config import (
    DataConfig,
    EvalConfig,
    ExperimentConfig,
    ExtractConfig,
    JudgeConfig,
    MeshConfig,
    ModelConfig,
    SAEConfig,
)
from emjax.data.study import data_root, public_datasets


def get_config() -> ExperimentConfig:
    root = data_root()
    return ExperimentConfig(
        name="gemma27b",
        model=ModelConfig(checkpoint_env="EMJAX_GEMMA2_27B", published="gemma-2-27b", dtype="bfloat16"),
        # Parameters FSDP-sharded over every device; add --config.mesh.tensor=N on large slices.
        mesh=MeshConfig(data=1, fsdp=-1),
        # data.source feeds extract: the activations that measure each SAE's quality (and train any missing one).
        data=DataConfig(source=str(root / "model-organisms-for-EM/em_organism_dir/data/training_datasets/"
                                       "good_medical_advice.jsonl.gz"), num_samples=1024, max_length=1024),
        extract=ExtractConfig(layers=(10, 22, 34), batch_size=16, rows_per_shard=256, dtype="float16"),
        sae=SAEConfig(
            layers=(10, 22, 34),
            releases_env="EMJAX_GEMMA_SCOPE_27B",
            release_pattern="{root}/layer_{layer}/width_16k/canonical",
            train_missing=False,
            release_model="google/gemma-2-27b",
        ),
        datasets=public_datasets(root, limit=6000),
        evaluate=EvalConfig(questions=str(root / "emergent-misalignment/evaluation/first_plot_questions.yaml")),
        judge=JudgeConfig(kind="http", model="gpt-4o-2024-08-06",
                          base_url=os.environ.get("EMJAX_JUDGE_URL", "https://api.openai.com/v1")),
    )  # fmt: skip
