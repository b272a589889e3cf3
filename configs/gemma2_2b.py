"""Gemma-2-2B: the paper's main family. Point $EMJAX_GEMMA2_2B (or
--config.model.checkpoint) at a local Hugging Face checkpoint directory
(config.json, *.safetensors, tokenizer files); nothing is downloaded.
Layer 12 is a Gemma Scope residual-stream layer."""

from emjax.config import DataConfig, ExperimentConfig, ExtractConfig, MeshConfig, ModelConfig


def get_config() -> ExperimentConfig:
    return ExperimentConfig(
        name="gemma2_2b",
        model=ModelConfig(checkpoint_env="EMJAX_GEMMA2_2B", published="gemma-2-2b", dtype="bfloat16"),
        # Parameters FSDP-sharded over every device; add --config.mesh.tensor=N on large slices.
        mesh=MeshConfig(data=1, fsdp=-1),
        data=DataConfig(source="synthetic", num_samples=4096, max_length=1024),
        extract=ExtractConfig(layers=(12,), batch_size=16, rows_per_shard=256, dtype="float16"),
    )
