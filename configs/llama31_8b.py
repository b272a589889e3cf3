"""Llama-3.1-8B(-Instruct). Point $EMJAX_LLAMA31_8B (or --config.model.checkpoint)
at a local Hugging Face checkpoint directory (config.json, *.safetensors,
tokenizer files); nothing is downloaded. Layer 15 is a Llama Scope residual layer."""

from emjax.config import DataConfig, ExperimentConfig, ExtractConfig, MeshConfig, ModelConfig


def get_config() -> ExperimentConfig:
    return ExperimentConfig(
        name="llama31_8b",
        model=ModelConfig(checkpoint_env="EMJAX_LLAMA31_8B", published="llama-3.1-8b", dtype="bfloat16"),
        mesh=MeshConfig(data=1, fsdp=-1),
        data=DataConfig(source="synthetic", num_samples=4096, max_length=1024),
        extract=ExtractConfig(layers=(15,), batch_size=16, rows_per_shard=256, dtype="float16"),
    )
