"""Gemma-2-27B: the paper's main family. Point $EMJAX_GEMMA2_27B (or --config.model.checkpoint) at a
local Hugging Face checkpoint directory (config.json, *.safetensors, tokenizer files); nothing is
downloaded.

The study (python -m emjax.main --config=gemma27b): the public EM datasets under $EMJAX_DATA_ROOT
(default ../shared/data; see emjax.study_configs.public_datasets), Gemma Scope residual SAEs (width
16k, canonical) from the suite at $EMJAX_GEMMA_SCOPE_27B (gemma-scope-27b-pt-res-canonical),
residual layers (10, 22, 34); LoRA fine-tunes with the reference recipe (rank 32, alpha 64, rsLoRA,
lr 1e-5, one epoch); the 8 first-plot questions x 100 answers judged by GPT-4o (judge.kind=http,
$OPENAI_API_KEY; $EMJAX_JUDGE_URL for any OpenAI-compatible server). Sized for one node of 8
accelerators (a multiple of 8 devices): `python -m emjax.dry_run --config=gemma27b --devices=8`.
"""

from emjax.config import ExperimentConfig, MeshConfig
from emjax.study_configs import gemma_scope, study_config


def get_config() -> ExperimentConfig:
    return study_config(
        "gemma27b",
        checkpoint_env="EMJAX_GEMMA2_27B",
        published="gemma-2-27b",
        layers=(10, 22, 34),
        sae=gemma_scope("EMJAX_GEMMA_SCOPE_27B", "google/gemma-2-27b"),
        # Tensor-parallel over an 8-device node (data-parallel over nodes): the weights stay resident, so a
        # decode step reads 1/8 of them from HBM instead of all-gathering the other 7/8 over NVLink, as FSDP
        # does on every token. `python -m emjax.dry_run --config=gemma27b --devices=8 --estimate
        # --device_kind=h100`: 2.5 h for the study this way, 15 h with fsdp=8 (evaluate's decoding).
        mesh=MeshConfig(data=-1, fsdp=1, tensor=8),
    )
