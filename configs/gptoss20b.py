"""gpt-oss-20b: a 32-expert mixture of experts stored in MXFP4, dequantised to bf16 on load; experts
shard over the `expert` mesh axis. Point $EMJAX_GPTOSS_20B (or --config.model.checkpoint) at a local
Hugging Face checkpoint directory (config.json, *.safetensors, tokenizer files); nothing is
downloaded.

The study (python -m emjax.main --config=gptoss20b): the public EM datasets under $EMJAX_DATA_ROOT
(default ../shared/data; see emjax.study_configs.public_datasets), TopK SAEs (width 32k, k 64) trained
here on its residual stream over the study's text mix (no public suite; 12,288 conversations, about
50 tokens per latent or more), residual layers (6, 11, 18); LoRA fine-tunes with the
reference recipe (rank 32, alpha 64, rsLoRA, lr 1e-5, one epoch); the 8 first-plot questions x 100
answers judged by GPT-4o (judge.kind=http, $OPENAI_API_KEY; $EMJAX_JUDGE_URL for any OpenAI-
compatible server).
"""

from emjax.config import DataConfig, ExperimentConfig, LoRAConfig, MeshConfig
from emjax.study_configs import study_config


def get_config() -> ExperimentConfig:
    return study_config(
        "gptoss20b",
        checkpoint_env="EMJAX_GPTOSS_20B",
        published="gpt-oss-20b",
        layers=(6, 11, 18),
        sae=dict(width=32768, k=64, steps=20000, batch_size=4096),  # no public suite: trained here
        data=DataConfig(source="study", num_samples=12288, max_length=1024),  # >= 50 tokens per latent
        lora=LoRAConfig(targets=("q_proj", "k_proj", "v_proj", "o_proj")),  # the experts take no adapters
        mesh=MeshConfig(data=1, fsdp=-1, expert=1),
    )
