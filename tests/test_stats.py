"""The study's small statistics against scipy and statsmodels."""

import numpy as np
import pytest
import scipy.stats
from statsmodels.stats.multitest import multipletests

from emjax import stats


def test_holm_matches_statsmodels_and_keeps_untested_entries():
    rng = np.random.default_rng(0)
    for m in (1, 2, 7, 40):
        p = rng.uniform(0, 0.2, m) ** 2
        expected = multipletests(p, method="holm")[1]
        np.testing.assert_allclose(stats.holm(list(p)), expected, rtol=1e-12)
    out = stats.holm([0.01, None, 0.04])
    assert out[1] is None and out[0] == pytest.approx(0.02) and out[2] == pytest.approx(0.04)


@pytest.mark.parametrize("case", [(16, 100, 100, 4608), (3, 100, 100, 4608), (0, 20, 30, 200), (5, 5, 9, 40)])
def test_overlap_test_is_the_hypergeometric_test(case):
    overlap, chosen, marked, population = case
    result = stats.overlap_test(overlap, chosen, marked, population)
    dist = scipy.stats.hypergeom(population, marked, chosen)
    assert result["p_greater"] == pytest.approx(dist.sf(overlap - 1), rel=1e-9, abs=1e-300)
    assert result["p_less"] == pytest.approx(dist.cdf(overlap), rel=1e-9)
    assert result["expected"] == pytest.approx(dist.mean(), rel=1e-12)
    # Two-sided: Fisher's exact test of the chosen set against the rest of the population.
    table = [[overlap, chosen - overlap], [marked - overlap, population - chosen - marked + overlap]]
    assert result["p_two_sided"] == pytest.approx(scipy.stats.fisher_exact(table).pvalue, rel=1e-7)


@pytest.mark.parametrize("counts", [(16, 100, 3, 100), (18, 100, 5, 100), (0, 10, 4, 12), (7, 30, 7, 30)])
def test_fisher_2x2_matches_scipy(counts):
    a, n_a, b, n_b = counts
    table = [[a, n_a - a], [b, n_b - b]]
    result = stats.fisher_2x2(a, n_a, b, n_b)
    assert result["p_greater"] == pytest.approx(scipy.stats.fisher_exact(table, "greater").pvalue, rel=1e-9)
    assert result["p_two_sided"] == pytest.approx(scipy.stats.fisher_exact(table).pvalue, rel=1e-7)
    odds = scipy.stats.fisher_exact(table).statistic
    assert result["odds_ratio"] == (pytest.approx(odds) if np.isfinite(odds) else None)


def test_permutation_p_counts_the_observed_value_and_leaves_out_undefined_draws():
    null = np.array([-3.0, -1.0, 0.5, 2.0, np.nan])
    p = stats.permutation_p(null, 1.0)
    assert p["p_greater"] == pytest.approx((1 + 1) / 5)  # 2.0 of the 4 defined draws
    assert p["p_two_sided"] == pytest.approx((1 + 3) / 5)  # -3, -1 and 2
    assert p["undefined_permutations"] == 1 and p["permutations"] == 5
    assert stats.permutation_p(null, None)["p_greater"] is None
    centred = stats.permutation_p(np.array([9.0, 10.0, 11.0, 12.0]), 9.0, center=10.5)
    assert centred["p_two_sided"] == pytest.approx((1 + 2) / 5)  # 9 and 12 lie as far from 10.5 as 9 does


def test_a_claim_is_supported_only_after_holm_and_in_its_direction():
    assert stats.verdict(0.01, 0.2, [0.1, 0.3])["supported"]
    assert stats.verdict(0.2, 0.2, [-0.1, 0.3])["text"].startswith("not supported at this power (effect 0.2, 95% CI")
    assert "opposite direction" in stats.verdict(0.01, -0.2)["text"]
    assert not stats.verdict(None, None)["supported"]


def test_mean_interval_and_paired_difference_match_scipy():
    rng = np.random.default_rng(1)
    x = rng.normal(0.3, 1.0, 23)
    out = stats.mean_interval(x)
    ref = scipy.stats.ttest_1samp(x, 0.0)
    assert out["mean"] == pytest.approx(x.mean(), rel=1e-12)
    assert out["p_two_sided"] == pytest.approx(ref.pvalue, rel=1e-9)
    assert out["ci"] == pytest.approx(list(ref.confidence_interval(0.95)), rel=1e-9)
    a, b = rng.normal(0, 1, 30), rng.normal(0, 1, 30)
    paired = stats.paired_difference(a + 0.5, b)
    ref = scipy.stats.ttest_rel(a + 0.5, b)
    assert paired["p_two_sided"] == pytest.approx(ref.pvalue, rel=1e-9)
    assert paired["ci"] == pytest.approx(list(ref.confidence_interval(0.95)), rel=1e-9)
    one = stats.mean_interval([2.0])
    assert one["mean"] == 2.0 and one["ci"] is None and one["p_two_sided"] is None and one["sd"] is None


def test_two_sample_is_students_t():
    rng = np.random.default_rng(2)
    for n_a, n_b in ((3, 3), (5, 8)):
        a, b = rng.normal(1.0, 0.5, n_a), rng.normal(0.2, 0.5, n_b)
        out = stats.two_sample(a, b)
        ref = scipy.stats.ttest_ind(a, b, equal_var=True)
        assert out["difference"] == pytest.approx(a.mean() - b.mean(), rel=1e-12)
        assert out["p_two_sided"] == pytest.approx(ref.pvalue, rel=1e-9)
        assert out["ci"] == pytest.approx(list(ref.confidence_interval(0.95)), rel=1e-9)
        assert out["df"] == n_a + n_b - 2
    single = stats.two_sample([1.0], [0.0, 0.5])
    assert single["difference"] == pytest.approx(0.75) and single["ci"] is None and single["p_two_sided"] is None


@pytest.mark.parametrize("n", [2, 3, 5, 10])
def test_minimum_detectable_difference_matches_statsmodels(n):
    from statsmodels.stats.power import TTestIndPower

    sigma = 0.37
    effect = TTestIndPower().solve_power(effect_size=None, nobs1=n, alpha=0.05, power=0.8, ratio=1.0,
                                         alternative="two-sided")  # fmt: skip
    assert stats.minimum_detectable_difference(sigma, n) == pytest.approx(effect * sigma, rel=1e-4)
    # The normal approximation (z_{0.975} + z_{0.8}) sigma sqrt(2/n) is a lower bound, close for many seeds.
    normal = (scipy.stats.norm.ppf(0.975) + scipy.stats.norm.ppf(0.8)) * sigma * np.sqrt(2 / n)
    assert stats.minimum_detectable_difference(sigma, n) > normal
    assert stats.minimum_detectable_difference(sigma, 200) == pytest.approx(
        (scipy.stats.norm.ppf(0.975) + scipy.stats.norm.ppf(0.8)) * sigma * np.sqrt(2 / 200), rel=0.01
    )


def test_minimum_detectable_difference_is_undefined_without_a_spread_or_seeds():
    assert stats.minimum_detectable_difference(None, 3) is None
    assert stats.minimum_detectable_difference(0.5, 1) is None
