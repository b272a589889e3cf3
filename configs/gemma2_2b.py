"""Gemma-2-2B: the paper's main family. Point $EMJAX_GEMMA2_2B (or --config.model.checkpoint) at a
local Hugging Face checkpoint directory (config.json, *.safetensors, tokenizer files); nothing is
downloaded.

The study (python -m emjax.main --config=gemma2_2b): the public EM datasets under $EMJAX_DATA_ROOT
(default ../shared/data; see emjax.study_configs.public_datasets), Gemma Scope residual SAEs (width
16k, canonical) from the suite at $EMJAX_GEMMA_SCOPE_2B (gemma-scope-2b-pt-res-canonical), residual
layers (6, 12, 18); LoRA fine-tunes with the reference recipe (rank 32, alpha 64, rsLoRA, lr 1e-5,
one epoch); the 8 first-plot questions x 100 answers judged by GPT-4o (judge.kind=http,
$OPENAI_API_KEY; $EMJAX_JUDGE_URL for any OpenAI-compatible server).
"""

from emjax.config import ExperimentConfig
from emjax.study_configs import gemma_scope, study_config


def get_config() -> ExperimentConfig:
    return study_config(
        "gemma2_2b",
        checkpoint_env="EMJAX_GEMMA2_2B",
        published="gemma-2-2b",
        layers=(6, 12, 18),
        sae=gemma_scope("EMJAX_GEMMA_SCOPE_2B", "google/gemma-2-2b"),
    )
