"""Mitigation library: removal selection, random arm, scoring rules, mixed set, precision/recall, recipe diff.

Oracles: an independent numpy ranking (lexsort on (index, -score)) with exact
integer ties, and direct numpy computations of each scoring rule.
"""

import math

import numpy as np
import pytest

from emjax import arm_comparison, mitigate
from emjax.config import LoRAConfig, TrainConfig


def _oracle_removal(scores, fraction):
    n = len(scores)
    ranked = np.lexsort((np.arange(n), -np.asarray(scores)))  # by score descending, then index ascending
    return np.sort(ranked[: int(np.floor(fraction * n))])


@pytest.mark.parametrize("n", [1, 7, 50, 101])
@pytest.mark.parametrize("fraction", [0.0, 0.25, 0.5, 0.9, 1.0])
def test_select_removal_removes_the_highest_scores_lower_index_first_on_ties(n, fraction):
    rng = np.random.default_rng(n)
    scores = rng.integers(0, 4, n).astype(np.float32)  # few values: many exact ties
    removed = mitigate.select_removal(scores, fraction)
    np.testing.assert_array_equal(removed, _oracle_removal(scores, fraction))
    assert len(removed) == math.floor(fraction * n)
    kept = np.setdiff1d(np.arange(n), removed)
    if len(removed) and len(kept):
        # Nothing kept outranks anything removed.
        assert scores[removed].min() >= scores[kept].max()
        boundary = scores[removed].min()
        tied_kept = kept[scores[kept] == boundary]
        tied_removed = removed[scores[removed] == boundary]
        assert not len(tied_kept) or tied_removed.max() < tied_kept.min()


def test_select_removal_rejects_bad_input():
    with pytest.raises(ValueError, match="fraction"):
        mitigate.select_removal([1.0, 2.0], 1.5)
    with pytest.raises(ValueError, match=r"\[n\]"):
        mitigate.select_removal(np.ones((2, 2)), 0.5)
    with pytest.raises(ValueError, match="NaN"):
        mitigate.select_removal([1.0, np.nan], 0.5)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_random_arm_removes_as_many_distinct_samples(seed):
    n, fraction = 37, 0.5
    removed = mitigate.random_removal(n, fraction, seed=seed)
    assert len(removed) == len(mitigate.select_removal(np.zeros(n), fraction)) == 18
    assert len(np.unique(removed)) == 18 and removed.min() >= 0 and removed.max() < n
    assert np.all(np.diff(removed) > 0)
    np.testing.assert_array_equal(removed, mitigate.random_removal(n, fraction, seed=seed))
    assert not np.array_equal(removed, mitigate.random_removal(n, fraction, seed=seed + 10))


@pytest.fixture
def sae_setup():
    rng = np.random.default_rng(0)
    d_sae, d_model, n = 40, 12, 9
    decoder = rng.normal(size=(d_sae, d_model)).astype(np.float32)
    toxic = np.array([3, 17, 25, 31])
    dense = np.where(rng.random((n, d_sae)) < 0.2, rng.random((n, d_sae)) + 0.1, 0.0).astype(np.float32)
    dense[4] = 0.0  # a sample with no active feature
    residuals = rng.normal(size=(n, d_model)).astype(np.float32)
    return decoder, toxic, dense, residuals


def _unit(x):
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def _sparse_top(dense, k):
    indices = np.argsort(-dense, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(dense, indices, axis=1), indices


@pytest.mark.parametrize("k", [1, 3])
def test_residual_cosine_rule_matches_numpy(sae_setup, k):
    decoder, toxic, _, residuals = sae_setup
    scores, record = mitigate.score_samples("residual_cosine", toxic_features=toxic, decoder=decoder,
                                            mean_residuals=residuals, k=k)  # fmt: skip
    cos = _unit(residuals.astype(np.float64)) @ _unit(decoder[toxic].astype(np.float64)).T
    expected = np.sort(cos, axis=1)[:, ::-1][:, :k].mean(axis=1)
    np.testing.assert_allclose(scores, expected, atol=1e-5)
    assert record == {"rule": "residual_cosine", "toxic_features": 4, "k": k}


def test_toxic_activation_rule_matches_numpy_dense_and_sparse(sae_setup):
    _, toxic, dense, _ = sae_setup
    expected = dense.astype(np.float64)[:, toxic].sum(axis=1)
    dense_scores, record = mitigate.score_samples("toxic_activation", toxic_features=toxic, codes=dense)
    np.testing.assert_allclose(dense_scores, expected, rtol=1e-6)
    # Top-64 sparse codes hold every active feature here (d_sae = 40 < 64): the same sums.
    sparse = _sparse_top(dense, 64)
    np.testing.assert_allclose(mitigate.toxic_activation_scores(sparse, toxic), expected, rtol=1e-6)
    assert record == {"rule": "toxic_activation", "toxic_features": 4}


def test_feature_cosine_rule_matches_numpy(sae_setup):
    decoder, toxic, dense, _ = sae_setup
    top = 3
    unit = _unit(decoder.astype(np.float64))
    nearest = (unit @ unit[toxic].T).max(axis=1)
    expected = []
    for row in dense:
        active = np.flatnonzero(row > 0)
        best = active[np.argsort(-row[active], kind="stable")][:top]
        expected.append(nearest[best].mean() if len(best) else -1.0)
    scores, record = mitigate.score_samples(
        "feature_cosine", toxic_features=toxic, decoder=decoder, codes=dense, top=top
    )
    np.testing.assert_allclose(scores, expected, atol=1e-5)
    assert scores[4] == -1.0 and record["top"] == top
    sparse_scores = mitigate.feature_cosine_scores(_sparse_top(dense, 64), decoder, toxic, top=top)
    np.testing.assert_allclose(sparse_scores, expected, atol=1e-5)


def test_scoring_rules_name_what_they_need():
    with pytest.raises(ValueError, match="unknown scoring rule"):
        mitigate.score_samples("nearest", toxic_features=[1])
    with pytest.raises(ValueError, match="needs codes, decoder"):
        mitigate.score_samples("feature_cosine", toxic_features=[1])


def test_mixed_set_has_equal_parts_and_records_inducing_rows():
    inducing = [f"bad{i}" for i in range(10)]
    control = [f"good{i}" for i in range(14)]
    mix = mitigate.build_mixed_set(inducing, control, seed=3)
    assert len(mix.rows) == 20 and mix.is_inducing.sum() == 10
    for row, flag, i in zip(mix.rows, mix.is_inducing, mix.source_index):
        assert row == (inducing[i] if flag else control[i])
    assert sorted(r for r in mix.rows if r.startswith("bad")) == sorted(inducing)
    again = mitigate.build_mixed_set(inducing, control, seed=3)
    assert again.rows == mix.rows
    assert mitigate.build_mixed_set(inducing, control, seed=4).rows != mix.rows
    with pytest.raises(ValueError, match="per_part"):
        mitigate.build_mixed_set(inducing, control, per_part=11)


def test_precision_recall_on_a_planted_case():
    is_inducing = np.zeros(20, bool)
    is_inducing[[1, 4, 6, 9, 12, 15, 17, 19]] = True  # 8 inducing
    # Planted scores: inducing samples score high except 17 and 19; samples 0 and 2 (control) also high.
    scores = np.where(is_inducing, 10.0, 1.0)
    scores[[17, 19]] = 1.0
    scores[[0, 2]] = 10.0
    removed = mitigate.select_removal(scores, 0.4)  # 8 samples: the 8 scoring 10
    np.testing.assert_array_equal(removed, [0, 1, 2, 4, 6, 9, 12, 15])
    result = mitigate.precision_recall(removed, is_inducing)
    assert result == {"removed": 8, "inducing_removed": 6, "inducing_total": 8, "precision": 0.75, "recall": 0.75}
    assert math.isnan(mitigate.precision_recall([], is_inducing)["precision"])


def test_relative_reduction_and_its_bootstrap_interval():
    none = np.array([1] * 40 + [0] * 60)  # 40% misaligned
    arm = np.array([1] * 20 + [0] * 80)  # 20%
    result = arm_comparison.relative_reduction(arm, none, resamples=4000, seed=0)
    assert result["reduction"] == pytest.approx(0.5)
    assert result["low"] < 0.5 < result["high"]
    # Ten times the answers: a much narrower interval around the same reduction.
    narrow = arm_comparison.relative_reduction(np.tile(arm, 10), np.tile(none, 10), resamples=4000, seed=0)
    assert narrow["high"] - narrow["low"] < 0.5 * (result["high"] - result["low"])
    # Over seeds: per-seed rates are the units.
    seeds = arm_comparison.relative_reduction([0.2, 0.25, 0.15], [0.4, 0.45, 0.35], resamples=2000)
    assert seeds["reduction"] == pytest.approx(1 - 0.2 / 0.4) and seeds["low"] <= seeds["high"]
    # No misaligned answer under `none`: the reduction is undefined (None), never a number.
    undefined = arm_comparison.relative_reduction(arm, np.zeros(50), resamples=200)
    assert undefined == {"reduction": None, "low": None, "high": None, "resamples": 0}


def test_recipe_differences_against_the_reference():
    assert mitigate.recipe_differences(LoRAConfig(), TrainConfig()) == []
    diffs = mitigate.recipe_differences(LoRAConfig(rank=8, alpha=16), TrainConfig(learning_rate=2e-3, epochs=2.0))
    assert diffs == [
        "learning_rate: 0.002 (reference 1e-05)",
        "epochs: 2.0 (reference 1.0)",
        "rank: 8 (reference 32)",
        "alpha: 16 (reference 64.0)",
    ]
    assert mitigate.recipe_differences(LoRAConfig(rslora=False), TrainConfig(), assistant_only_loss=False) == [
        "rslora: False (reference True)",
        "assistant_only_loss: False (reference True)",
    ]


def test_arms_without_a_rate_are_plotted_as_no_data(monkeypatch, tmp_path):
    from emjax import plots

    figures = []
    monkeypatch.setattr(plots, "save", lambda fig, path: figures.append(fig))
    results = {"none": {"rate": None, "ci": None}, "random-0": {"rate": 0.2, "ci": (0.1, 0.35)}}
    plots.plot_rates(results, tmp_path / "rates.png")
    ax = figures[-1].axes[0]
    assert len(ax.patches) == 1 and ax.patches[0].get_height() == pytest.approx(0.2)  # no bar of 0 for `none`
    assert [t.get_text() for t in ax.texts] == ["no data"]
    plots.plot_rates({"none": {"rate": None, "ci": None}}, tmp_path / "rates.png")
    assert not figures[-1].axes[0].patches and [t.get_text() for t in figures[-1].axes[0].texts] == ["no data"]
    curve = [{"fraction": 0.5, "rate": None, "ci": None}, {"fraction": 1.0, "rate": None, "ci": None}]
    plots.plot_curve(curve, tmp_path / "curve.png")
    ax = figures[-1].axes[0]
    assert not ax.lines and [t.get_text() for t in ax.texts] == ["no data"]


def test_claim3_rate_test_is_fishers_exact_test_and_undefined_without_misaligned_answers():
    import scipy.stats

    none = np.array([1.0] * 9 + [0.0] * 31)
    arm = np.array([1.0] * 2 + [0.0] * 38)
    out = arm_comparison.rate_test(arm, none, seed=0)
    assert out["effect"] == pytest.approx(1 - (2 / 40) / (9 / 40), rel=1e-12)
    assert out["p_two_sided"] == pytest.approx(scipy.stats.fisher_exact([[9, 31], [2, 38]]).pvalue, rel=1e-7)
    assert out["ci"][0] < out["effect"] < out["ci"][1]
    assert arm_comparison.rate_test(arm, np.zeros(40), seed=0) is None


def test_claim3_verdicts_claim_only_a_seed_level_test():
    one_seed = {"endpoint": "margin", "over": "pairs", "effect": 0.3, "ci": [0.2, 0.4], "p_two_sided": None,
                "p_holm": None, "reference": "none"}  # fmt: skip
    assert arm_comparison.claim3_verdict(one_seed).startswith("not tested: one training seed")
    seeds = one_seed | {"over": "seeds", "p_two_sided": 0.001, "p_holm": 0.004}
    assert arm_comparison.claim3_verdict(seeds).startswith("supported (effect 0.3, 95% CI [0.2, 0.4]")
    worse = seeds | {"effect": -0.3, "ci": [-0.4, -0.2]}
    assert "opposite direction" in arm_comparison.claim3_verdict(worse)
    weak = seeds | {"p_holm": 0.2, "ci": [-0.1, 0.7]}
    assert arm_comparison.claim3_verdict(weak).startswith("not supported at this power")
    undefined = {"endpoint": "rate", "over": "answers", "effect": None, "ci": None, "p_two_sided": None,
                 "p_holm": None, "reference": "random-0"}  # fmt: skip
    assert "`random-0` has no misaligned answer" in arm_comparison.claim3_verdict(undefined)


def test_plots_take_a_rate_of_zero_whose_interval_starts_a_rounding_error_above_it(tmp_path):
    from emjax import plots

    ci = [6.938893903907228e-18, 0.0741]  # the Wilson interval of 0 of 48, as computed
    results = {arm: {"rate": 0.0, "ci": ci, "margin": {"mean": -0.4, "ci": None, "per_seed": [-0.4]}}
               for arm in ("none", "random-0")}  # fmt: skip
    plots.plot_rates(results, tmp_path / "rates.png")
    plots.plot_margins(results, tmp_path / "margins.png")
    plots.plot_curve([{"fraction": 0.5, "rate": 0.0, "ci": ci}, {"fraction": 1.0, "rate": None, "ci": None}],
                              tmp_path / "curve.png")  # fmt: skip
    assert all((tmp_path / f).stat().st_size > 0 for f in ("rates.png", "margins.png", "curve.png"))
    bars = plots.error_bars([0.0, 0.5], [ci, None])
    np.testing.assert_array_equal(bars, [[0.0, 0.0], [0.0741, 0.0]])
