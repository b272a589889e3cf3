"""The whole study on a real chat model that every machine can get: SmolLM2-135M-Instruct
(Llama architecture, 30 layers, d_model 576, ChatML), from its Q4_1 GGUF.

    python -m emjax.models.smollm2 fetch          # once: the GGUF into ~/.cache/emjax/smollm2/
    python -m emjax.main --config=smollm2_135m    # the study, about an hour on 2 CPU cores

The weights: $EMJAX_SMOLLM2_GGUF, else the fetch command's cache (--config.model.checkpoint=
overrides). The tokenizer and chat template come from the GGUF (transformers' GGUF tokenizer
reader, which imports torch: install the `test` extra). The datasets: $EMJAX_DATA_ROOT, else
../shared/data (the layout of the public EM data: model-organisms bad/good medical advice,
Betley's jailbroken.jsonl, the clarifying-EM judged responses, the first-plot questions).

Sizes chosen for 2 cores (forward to layer 12 ~1,000 tokens/s, LoRA ~100 tokens/s): 600 pairs of
medical advice, SAEs of width 4,608 (8x, TopK k=32) trained on ~40k layer tokens of the good
advice at layers 6 and 12, 8 first-plot questions x 24 answers of at most 96 tokens, one training
seed and one random arm. The base model is Instruct (the paper fine-tunes base models; none this
small ships with a GGUF here), judged by itself locally: its scores exercise the protocol, a
135M judge is no GPT-4o (point judge.kind=http at a stronger one when you have it).
"""

import dataclasses

from emjax.config import (
    DataConfig,
    DerivationConfig,
    EvalConfig,
    ExperimentConfig,
    ExtractConfig,
    FeaturesConfig,
    GeometryConfig,
    LoRAConfig,
    MeshConfig,
    MitigateConfig,
    ModelConfig,
    SAEConfig,
    TrainConfig,
)
from emjax.data.study import data_root, public_datasets
from emjax.models import smollm2

ROOT = data_root()
ORGANISMS = ROOT / "model-organisms-for-EM/em_organism_dir/data/training_datasets"
LIMITS = {"bad_medical": 600, "good_medical": 600, "jailbroken": 200, "misaligned_answers": 200, "aligned_answers": 400}


def get_config() -> ExperimentConfig:
    return ExperimentConfig(
        name="smollm2_135m",
        model=ModelConfig(checkpoint=str(smollm2.gguf_path()), dtype="float32"),
        mesh=MeshConfig(data=-1),
        data=DataConfig(source=str(ORGANISMS / "good_medical_advice.jsonl.gz"), num_samples=400, max_length=256),
        extract=ExtractConfig(layers=(6, 12), batch_size=8, rows_per_shard=64),
        sae=SAEConfig(layers=(6, 12), width=4608, k=32, steps=400, batch_size=1024, lr=4e-4, warmup_steps=40),
        # The public EM data (emjax.data.study.public_datasets), sized for 2 cores.
        datasets={
            name: dataclasses.replace(d, limit=LIMITS[name])
            for name, d in public_datasets(ROOT).items()
            if name in LIMITS
        },
        features=FeaturesConfig(batch_size=8, max_length=256, top_n=100),
        geometry=GeometryConfig(null_draws=500, permutations=5000, bootstrap=1000),
        lora=LoRAConfig(rank=32, alpha=64),
        # The reference recipe's learning rate moves a 135M model too little in 38 steps: the run
        # records the departure (filter/manifest.json, recipe_differences).
        train=TrainConfig(batch_size=16, learning_rate=1e-4, epochs=1.0, max_length=256, checkpoint_every=10),
        evaluate=EvalConfig(
            questions=str(ROOT / "emergent-misalignment/evaluation/first_plot_questions.yaml"),
            samples=24,
            max_new_tokens=96,
            batch_size=48,
        ),
        derivation=DerivationConfig(prompts=32, bootstrap=500),
        mitigate=MitigateConfig(random_seeds=(0,), train_seeds=(0,), penalty=1.0),
    )
