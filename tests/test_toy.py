"""The toy model of superposition: spillover follows the planted geometry, the first-order account
holds, and filters and mitigations rank as the geometric account says."""

import json

import numpy as np
import pytest

from emjax import toy
from emjax.config import ToyConfig

# Ablation and penalty may cost the target (the task) at most this share of its plain amplification.
TARGET_TOLERANCE = 0.15


@pytest.fixture(scope="module")
def result(tmp_path_factory):
    out = tmp_path_factory.mktemp("toy")
    return toy.run_toy(ToyConfig(), out), out


def test_planted_geometry_has_the_requested_cosines():
    cfg = ToyConfig()
    g = toy.plant(cfg)
    np.testing.assert_allclose(np.linalg.norm(g.directions, axis=1), 1.0, atol=1e-6)
    cos = g.directions[g.toxic] @ g.directions[g.target]
    np.testing.assert_allclose(cos, np.repeat(cfg.toxic_cosines, cfg.toxic_per_cosine), atol=1e-6)
    assert g.directions.shape == (cfg.num_features, cfg.hidden_dim) and cfg.hidden_dim < cfg.num_features


def test_toy_json_has_every_toxic_feature_and_arm(result):
    r, out = result
    written = json.loads((out / "toy.json").read_text())
    cfg = ToyConfig()
    assert len(written["features"]) == len(cfg.toxic_cosines) * cfg.toxic_per_cosine
    assert set(written["features"][0]) == {"id", "cosine", "measured", "predicted"}
    for key in ("filter", "target"):
        assert set(written[key]) == {"none", "geometry", "random", "ablation", "penalty"}
        assert len(written[key]["random"]) == cfg.random_seeds
    assert (out / "amplification_vs_cosine.png").stat().st_size > 0
    assert (out / "predicted_vs_measured.png").stat().st_size > 0


def test_toxic_amplification_rises_with_the_planted_cosine(result):
    features = result[0]["features"]
    cosines = sorted({f["cosine"] for f in features})
    means = [np.mean([f["measured"] for f in features if f["cosine"] == c]) for c in cosines]
    assert all(b > a for a, b in zip(means, means[1:])), means
    assert means[-1] > 0.05  # a real spill, not rounding


def test_first_order_prediction_matches_measurement(result):
    features = result[0]["features"]
    predicted = [f["predicted"] for f in features]
    measured = [f["measured"] for f in features]
    assert np.corrcoef(predicted, measured)[0, 1] >= 0.95
    # the geometric law, fitted on the target alone, holds out of sample on the toxic features
    assert result[0]["geometric"]["pearson"] >= 0.95
    assert result[0]["geometric"]["max_abs_error"] < 0.1 * max(abs(m) for m in measured)


def test_geometry_filter_beats_every_random_removal(result):
    r = result[0]
    assert r["inducing_removed_by_geometry"] == ToyConfig().finetune_samples
    assert all(r["filter"]["geometry"] < seed for seed in r["filter"]["random"])


@pytest.mark.parametrize("arm", ["ablation", "penalty"])
def test_mitigations_reduce_toxic_spill_and_keep_the_target(result, arm):
    r = result[0]
    assert r["filter"][arm] <= r["filter"]["geometry"]
    assert r["target"][arm] >= (1 - TARGET_TOLERANCE) * r["target"]["none"]
    assert r["target"]["none"] > 0.5 * ToyConfig().gain * 0.75  # the task is learnt (target mean 0.75)


def test_ablated_fine_tune_leaves_the_toxic_span_untouched():
    """Ablating the toxic span during fine-tuning: every toxic readout is unchanged on any input
    (the output projection's update lies in the span's orthogonal complement)."""
    cfg = ToyConfig(pretrain_steps=50, finetune_steps=20, finetune_samples=16)
    g = toy.plant(cfg)
    base = toy.pretrain(cfg, g)
    rng = np.random.default_rng(0)
    x = toy.sparse_inputs(rng, 32, cfg.num_features, 0.2)
    amplified = np.zeros(32, np.int64)
    x[:, 0] = 1.0
    tuned = toy.finetune(
        cfg, base, g, x, amplified, toy.Arm(keep=np.ones(32, bool), ablate=toy.toxic_basis(g.directions, g.toxic))
    )
    probe = toy.sparse_inputs(rng, 64, cfg.num_features, 0.2)
    shift = toy.amplification(tuned, base, g.directions, probe)
    assert np.max(np.abs(shift[g.toxic])) < 1e-4
    assert shift[g.target] > 0.05


def test_deterministic_by_seed():
    cfg = ToyConfig(pretrain_steps=20, finetune_steps=5)
    g = toy.plant(cfg)
    a, b = toy.pretrain(cfg, g), toy.pretrain(cfg, g)
    for k in a:
        np.testing.assert_array_equal(np.asarray(a[k]), np.asarray(b[k]))


def test_bad_geometry_is_refused():
    with pytest.raises(ValueError, match="num_features"):
        toy.plant(ToyConfig(num_features=20))
    with pytest.raises(ValueError, match="0.0"):
        toy.plant(ToyConfig(toxic_cosines=(0.5,)))
