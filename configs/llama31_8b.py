"""Llama-3.1-8B. Point $EMJAX_LLAMA31_8B (or --config.model.checkpoint) at a local Hugging Face
checkpoint directory (config.json, *.safetensors, tokenizer files); nothing is downloaded.

The study (python -m emjax.main --config=llama31_8b): the public EM datasets under $EMJAX_DATA_ROOT
(default ../shared/data; see emjax.study_configs.public_datasets), Llama Scope residual SAEs (8x, 32k)
from the suite at $EMJAX_LLAMA_SCOPE (fnlp/Llama-Scope, L{layer}R-8x), residual layers (8, 15, 24);
LoRA fine-tunes with the reference recipe (rank 32, alpha 64, rsLoRA, lr 1e-5, one epoch); the 8
first-plot questions x 100 answers judged by GPT-4o (judge.kind=http, $OPENAI_API_KEY;
$EMJAX_JUDGE_URL for any OpenAI-compatible server).
"""

from emjax.config import ExperimentConfig
from emjax.study_configs import study_config


def get_config() -> ExperimentConfig:
    return study_config(
        "llama31_8b", checkpoint_env="EMJAX_LLAMA31_8B", published="llama-3.1-8b", layers=(8, 15, 24),
        sae=dict(
            releases_env="EMJAX_LLAMA_SCOPE", release_pattern="{root}/Llama3_1-8B-Base-L{layer}R-8x",
            train_missing=False, release_model="meta-llama/Llama-3.1-8B",
        ),
    )  # fmt: skip
