"""gpt-oss-20b: a 32-expert mixture of experts stored in MXFP4, dequantised to bf16
on load. Point $EMJAX_GPTOSS_20B (or --config.model.checkpoint) at a local Hugging
Face checkpoint directory; nothing is downloaded. Experts shard over the `expert`
mesh axis (32 experts divide over 1, 2, 4, 8, 16 or 32 devices)."""

from emjax.config import DataConfig, ExperimentConfig, ExtractConfig, MeshConfig, ModelConfig


def get_config() -> ExperimentConfig:
    return ExperimentConfig(
        name="gptoss20b",
        model=ModelConfig(checkpoint_env="EMJAX_GPTOSS_20B", published="gpt-oss-20b", dtype="bfloat16"),
        mesh=MeshConfig(data=1, fsdp=-1, expert=1),
        data=DataConfig(source="synthetic", num_samples=4096, max_length=1024),
        extract=ExtractConfig(layers=(11,), batch_size=16, rows_per_shard=256, dtype="float16"),
    )
