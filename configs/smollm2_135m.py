"""The whole study on a real chat model that every machine can get: SmolLM2-135M-Instruct
(Llama architecture, 30 layers, d_model 576, ChatML), from its Q4_1 GGUF.

    python -m emjax.models.smollm2 fetch          # once: the GGUF into ~/.cache/emjax/smollm2/
    python -m emjax.main --config=smollm2_135m    # the whole study, about 1.5-2 hours on 2 CPU cores

The weights: $EMJAX_SMOLLM2_GGUF, else the fetch command's cache (--config.model.checkpoint=
overrides). The tokenizer and chat template come from the GGUF (transformers' GGUF tokenizer
reader, which imports torch: install the `test` extra). The datasets: $EMJAX_DATA_ROOT, else
../shared/data (the layout of the public EM data: model-organisms bad/good medical advice, the
clarifying-EM judged responses, the first-plot questions). The toxic features come from the
style-matched contrast (emjax.data.style_matched): misaligned against aligned answers of the same
fixture models to the same questions, the models fine-tuned on bad medical advice left out; that
leaves one model's answers (Qwen-Coder-Insecure: 12 misaligned + 11 aligned in the selection half),
so the toxic set is small and noisy at this size. Claim 3's margin reads its own pairs: every fixture
model's, bad-medical fine-tunes included, on the 7 questions outside the selection half (184 pairs;
style_matched.margin_pairs).

The judge: SmolLM2-135M cannot judge (under 1% of its next-token mass on integers, no agreement with
GPT-4o: benchmarks/RESULTS.md), so this config uses a probe judge (emjax.probe_judge): ridge
regressions from its layer-15 residuals to GPT-4o's aligned and coherent scores, fitted on 150
judged answers of each of five fine-tunes and base models in the clarifying-EM fixture, validated on
a sixth model's answers (Qwen2.5-32B bad medical advice; the report prints the agreement). Point
judge.kind=http at a real judge when you have one.

Sizes for power within about 2 hours on 2 cores (measured on this machine: a LoRA step of 16 rows
of 192 tokens ~20 s; a full forward ~450 tokens/s, so the margin's 184 pairs take ~105 s per model
and sampling 64 answers ~46 s): 1,000 paired medical samples a side for feature selection (the
geometry's power), of which the first 160 fine-tune each dataset; a TopK SAE of width 4,608 (8x,
k=32) at one layer (6: the mitigation's, the earliest of the last run), trained on about 290k tokens
of the study's text mix (2,000 conversations of at most 192 tokens, position 0 left out: over 50
tokens per latent); the mitigation mix 100 + 100 samples, 20 of them held out from every arm (each
arm's task loss), its arms none, geometry and random, each fine-tuned with three training seeds
(the margin's seed-to-seed SD and the comparison's power; `none` also at half its training; the
judge and ablation arms are left out for time: --config.mitigate.judge_filter=true adds ~15 min);
8 first-plot questions x 8 answers of at most 64 tokens; the margin on all 184 pairs. The base model
is Instruct (the paper fine-tunes base models; none this small ships as a GGUF here).
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
    JudgeConfig,
    LoRAConfig,
    MeshConfig,
    MitigateConfig,
    ModelConfig,
    SAEConfig,
    TrainConfig,
)
from emjax.models import smollm2
from emjax.study_configs import data_root, public_datasets

ROOT = data_root()
JUDGED = ROOT / "clarifying_EM-judged-responses/open_models"
LIMITS = {"bad_medical": 1000, "good_medical": 1000, "misaligned_answers": None, "aligned_answers": None}


def get_config() -> ExperimentConfig:
    return ExperimentConfig(
        name="smollm2_135m",
        model=ModelConfig(checkpoint=str(smollm2.gguf_path()), dtype="float32"),
        mesh=MeshConfig(data=-1),
        # The SAE's text: every study dataset's conversations, interleaved (sae.tokens_per_latent=50 needs 230k).
        data=DataConfig(source="study", num_samples=2000, max_length=192),
        extract=ExtractConfig(layers=(6,), batch_size=8, rows_per_shard=64),
        sae=SAEConfig(layers=(6,), width=4608, k=32, steps=300, batch_size=1024, lr=4e-4, warmup_steps=30),
        # The public EM data (emjax.study_configs.public_datasets), sized for 2 cores.
        datasets={
            name: dataclasses.replace(d, limit=LIMITS[name])
            for name, d in public_datasets(ROOT).items()
            if name in LIMITS
        },
        features=FeaturesConfig(batch_size=8, max_length=192, top_n=100),
        geometry=GeometryConfig(null_draws=500, selection_permutations=5000, permutations=5000, bootstrap=1000),
        lora=LoRAConfig(rank=32, alpha=64),
        # The reference recipe's learning rate moves a 135M model too little in 38 steps: the run
        # records the departure (filter/manifest.json, recipe_differences).
        # 135M parameters train fine without rematerialisation on a 24 GiB host, ~25% faster.
        # The datasets' own fine-tunes read their first 160 samples (the mix reads its 100 + 100).
        train=TrainConfig(
            batch_size=16, learning_rate=1e-4, epochs=1.0, max_length=192, checkpoint_every=10, remat="none",
            num_samples=160,
        ),
        evaluate=EvalConfig(
            questions=str(ROOT / "emergent-misalignment/evaluation/first_plot_questions.yaml"),
            samples=8,
            max_new_tokens=64,
            batch_size=48,
            margin_max_length=256,
            margin_batch_size=16,
        ),
        derivation=DerivationConfig(prompts=16, bootstrap=500),
        judge=JudgeConfig(
            kind="probe",
            probe_data=tuple(
                str(JUDGED / f)
                for f in (
                    "model_baselines/responses_gemma-2-9b-it_base.csv",
                    "model_baselines/responses_gemma-2-27b-it_base.csv",
                    "diff_models/responses_gemma-2-9b-it-bad_medical_advice.csv",
                    "diff_models/responses_gemma-2-27b-it-bad_medical_advice.csv",
                    "diff_models/responses_Qwen-Coder-Insecure.csv",
                )
            ),
            probe_heldout=str(JUDGED / "diff_models/responses_Qwen2.5-32B-Instruct-bad_medical_advice.csv"),
            probe_samples=150,
        ),
        mitigate=MitigateConfig(
            per_part=100, random_seeds=(0,), train_seeds=(0, 1, 2), judge_filter=False, ablation=False,
            random_directions=False, curve=(0.5,),
        ),
    )
