"""Variant names (emjax.variant): parsed and written in one place, and which of them a config has."""

import dataclasses

import pytest

from emjax import config as config_lib
from emjax.variant import (
    Variant,
    curve_variants,
    dataset_variants,
    evaluate_variants,
    layer_of,
    layer_variant,
    mix_variants,
    train_variants,
)


@pytest.mark.parametrize(
    "name, expected",
    [
        ("bad_advice", Variant(dataset="bad_advice")),
        ("source", Variant(dataset="source")),
        ("base", Variant(dataset="base")),
        ("bad_advice@50", Variant(dataset="bad_advice", along="50")),
        ("mix-none-s0", Variant(arm="none", seed=0)),
        ("mix-random-12-s3", Variant(arm="random-12", seed=3)),
        ("mix-geometry-residual_cosine-s1@12.5", Variant(arm="geometry-residual_cosine", seed=1, along="12.5")),
        # an arm whose own name holds "-s": the seed is the last "-s<digits>"
        ("mix-geometry-feature-s-s10", Variant(arm="geometry-feature-s", seed=10)),
    ],
)
def test_parse_and_format_round_trip(name, expected):
    assert Variant.parse(name) == expected
    assert str(expected) == name


def test_the_fine_tune_of_a_point_along_training():
    v = Variant.parse("mix-none-s2@25")
    assert v.is_mix and v.arm == "none" and v.seed == 2 and v.along == "25"
    assert str(v.trained) == "mix-none-s2" and not Variant.parse("bad_advice").is_mix
    assert str(Variant.mix("judge", 4, "50")) == "mix-judge-s4@50"
    assert str(Variant.parse("mix-none-s2").at("75")) == "mix-none-s2@75"


@pytest.mark.parametrize("name", ["mix-none", "mix-none-sx", "mix--s1", "bad_advice@", "mix-none-s"])
def test_malformed_names_are_errors_naming_them(name):
    with pytest.raises(ValueError, match=f"variant {name!r}"):
        Variant.parse(name)


def test_a_variant_is_a_dataset_or_an_arm_with_a_seed():
    for bad in (dict(), dict(dataset="a", arm="none", seed=0), dict(arm="none"), dict(dataset="a", seed=1)):
        with pytest.raises(ValueError):
            Variant(**bad)


def test_sae_layer_variants():
    assert layer_variant(12) == "layer12" and layer_of("layer12") == 12


def _study(**mitigate) -> config_lib.ExperimentConfig:
    d = config_lib.DatasetConfig
    return config_lib.ExperimentConfig(
        datasets={"bad": d(source="synthetic", role="inducing", pair="good"), "good": d(source="synthetic",
                  role="control"), "toxic": d(source="synthetic", role="harmful")},
        mitigate=dataclasses.replace(config_lib.MitigateConfig(), **mitigate),
    )  # fmt: skip


def test_the_variants_a_config_has():
    cfg = _study(rules=("residual_cosine",), random_seeds=(0,), judge_filter=False, ablation=True,
                 random_directions=False, penalty=0.0, train_seeds=(0, 1), curve=(0.5,))  # fmt: skip
    assert dataset_variants(cfg) == ["bad", "good"]
    mixed = ["mix-none-s0", "mix-none-s1", "mix-geometry-residual_cosine-s0", "mix-geometry-residual_cosine-s1",
             "mix-random-0-s0", "mix-random-0-s1", "mix-ablation-s0", "mix-ablation-s1"]  # fmt: skip
    assert mix_variants(cfg) == mixed
    assert train_variants(cfg) == ["bad", "good"] + mixed
    assert curve_variants(cfg) == ["mix-none-s0@50", "mix-none-s1@50"]
    assert evaluate_variants(cfg) == ["base", "bad", "good"] + mixed + ["mix-none-s0@50", "mix-none-s1@50"]
    alone = config_lib.ExperimentConfig()  # no study datasets: the source fine-tune only, no mix
    assert train_variants(alone) == ["source"] and mix_variants(alone) == [] and curve_variants(alone) == []
