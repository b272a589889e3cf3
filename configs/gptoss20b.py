"""gpt-oss-20b: a 32-expert mixture of experts stored in MXFP4, dequantised to bf16 on load; experts
shard over the `expert` mesh axis. Point $EMJAX_GPTOSS_20B (or --config.model.checkpoint) at a local
Hugging Face checkpoint directory (config.json, *.safetensors, tokenizer files); nothing is
downloaded.

The study (python -m emjax.main --config=gptoss20b): the public EM datasets under $EMJAX_DATA_ROOT
(default ../shared/data; see emjax.data.study.public_datasets), TopK SAEs (width 32k, k 64) trained
here on its residual stream (no public suite), residual layers (6, 11, 18); LoRA fine-tunes with the
reference recipe (rank 32, alpha 64, rsLoRA, lr 1e-5, one epoch); the 8 first-plot questions x 100
answers judged by GPT-4o (judge.kind=http, $OPENAI_API_KEY; $EMJAX_JUDGE_URL for any OpenAI-
compatible server).
"""

import os

from emjax.config import (
    DataConfig,
    EvalConfig,
    ExperimentConfig,
    ExtractConfig,
    JudgeConfig,
    LoRAConfig,
    MeshConfig,
    ModelConfig,
    SAEConfig,
)
from emjax.data.study import data_root, public_datasets


def get_config() -> ExperimentConfig:
    root = data_root()
    return ExperimentConfig(
        name="gptoss20b",
        model=ModelConfig(checkpoint_env="EMJAX_GPTOSS_20B", published="gpt-oss-20b", dtype="bfloat16"),
        # Parameters FSDP-sharded over every device; add --config.mesh.tensor=N on large slices.
        mesh=MeshConfig(data=1, fsdp=-1, expert=1),
        # data.source feeds extract: the activations that measure each SAE's quality (and train any missing one).
        data=DataConfig(source=str(root / "model-organisms-for-EM/em_organism_dir/data/training_datasets/"
                                       "good_medical_advice.jsonl.gz"), num_samples=1024, max_length=1024),
        extract=ExtractConfig(layers=(6, 11, 18), batch_size=16, rows_per_shard=256, dtype="float16"),
        lora=LoRAConfig(targets=("q_proj", "k_proj", "v_proj", "o_proj")),  # the experts take no adapters
        sae=SAEConfig(
            layers=(6, 11, 18),
            width=32768,
            k=64,
            steps=20000,
            batch_size=4096,
        ),
        datasets=public_datasets(root, limit=6000),
        evaluate=EvalConfig(questions=str(root / "emergent-misalignment/evaluation/first_plot_questions.yaml")),
        judge=JudgeConfig(kind="http", model="gpt-4o-2024-08-06",
                          base_url=os.environ.get("EMJAX_JUDGE_URL", "https://api.openai.com/v1")),
    )  # fmt: skip
