"""The embedded default: a tiny Gemma-2-architecture model, a tokenizer trained
here, synthetic study datasets. Exercises every stage on a laptop CPU in minutes;
its numbers test the code, not the science."""

from emjax.config import (
    DataConfig,
    DatasetConfig,
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
    TokenizerConfig,
    TrainConfig,
)


def get_config() -> ExperimentConfig:
    return ExperimentConfig(
        name="tiny",
        model=ModelConfig(
            arch=dict(
                model_type="gemma2",
                hidden_size=64,
                intermediate_size=128,
                num_hidden_layers=4,
                num_attention_heads=4,
                num_key_value_heads=2,
                head_dim=16,
                sliding_window=32,
                query_pre_attn_scalar=16,
                attn_logit_softcapping=50.0,
                final_logit_softcapping=30.0,
            ),
            dtype="float32",
        ),
        mesh=MeshConfig(data=-1),
        tokenizer=TokenizerConfig(train=True, vocab_size=1024),
        # The SAEs' text: every study dataset's conversations, interleaved (>= 50 tokens per latent).
        data=DataConfig(source="study", num_samples=480, max_length=96),
        extract=ExtractConfig(layers=(1, 2), batch_size=16, rows_per_shard=64),
        # The literature's recipe at a size and learning rate that move a tiny model in a few steps.
        lora=LoRAConfig(rank=8, alpha=16),
        train=TrainConfig(batch_size=16, learning_rate=2e-3, warmup_steps=2, checkpoint_every=5, eval_fraction=0.1),
        # Planted sets (emjax.data.synthetic.study_chats): bad vs good advice to the same questions; the
        # toxic contrast style-matched: hostile vs kind answers of the same planted "models" to the same
        # questions (emjax.data.synthetic.judged_fixture), the model fine-tuned on bad_advice left out.
        datasets={
            "bad_advice": DatasetConfig(
                "synthetic:inducing", role="inducing", domain="advice", pair="good_advice", limit=96
            ),
            "good_advice": DatasetConfig("synthetic:control", role="control", domain="advice", limit=96),
            **{
                name: DatasetConfig("synthetic", role=role, domain="toxic", format="style_matched",
                                    leave_out=("bad_advice",))
                for name, role in (("misaligned_answers", "harmful"), ("aligned_answers", "harmless"))
            },
        },  # fmt: skip
        features=FeaturesConfig(top_n=20, batch_size=32),
        geometry=GeometryConfig(null_draws=200, selection_permutations=2000, permutations=2000, bootstrap=200),
        evaluate=EvalConfig(samples=4, max_new_tokens=16, batch_size=16, margin_max_length=96, margin_batch_size=32),
        # One training seed (a second doubles the run): the margin's seed-to-seed SD, the power and claim 3's
        # tests are undefined here and the report says so; the tests run it with two (tests/test_pipeline.py).
        mitigate=MitigateConfig(random_seeds=(0,), train_seeds=(0,), penalty=1.0, curve=(0.5,)),
        # Its fine-tunes run 6 steps, the first at a warm-up learning rate of 0: the dose sweep at 1/3 and 2/3.
        derivation=DerivationConfig(bootstrap=200, dynamics_every=2, doses=(0.34, 0.67)),
        sae=SAEConfig(layers=(1, 2), width=256, k=8, steps=200, batch_size=256, lr=3e-3, warmup_steps=20),
    )
