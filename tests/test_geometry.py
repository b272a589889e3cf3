"""Feature geometry against planted cosines and a numpy brute force; permutation p-values under the null."""

import numpy as np
import pytest
import scipy.stats
from flax import nnx

import emjax.sae
from emjax import distributed, geometry

D = 24


def orthonormal(rng, n, d=D):
    q, _ = np.linalg.qr(rng.normal(size=(d, n)))
    return q.T  # n orthonormal rows


def unit(v):
    return v / np.linalg.norm(v)


def cosines(decoder):
    m = np.asarray(decoder, np.float64)
    norm = np.linalg.norm(m, axis=1, keepdims=True)
    u = np.divide(m, norm, out=np.zeros_like(m), where=norm > 0)
    return u @ u.T


def oracle_proximity(decoder, sources, toxic, k):
    c = cosines(decoder)
    out = []
    for s in sources:
        others = [t for t in toxic if t != s and np.linalg.norm(decoder[t]) > 0]
        out.append(np.sort(c[s, others])[::-1][:k].mean())
    return np.array(out)


def planted():
    """Toxic features 0..3 orthonormal; feature 4+i has cosine c_i with toxic feature i % 4 only."""
    rng = np.random.default_rng(0)
    basis = orthonormal(rng, 12)
    planted_cos = np.array([0.9, 0.6, 0.3, 0.75, 0.1, 0.45])
    decoder = np.zeros((20, D))
    decoder[:4] = basis[:4] * rng.uniform(0.5, 2.0, (4, 1))  # any norm: rows are normalised
    for i, c in enumerate(planted_cos):
        decoder[4 + i] = 3.0 * (c * basis[i % 4] + np.sqrt(1 - c * c) * basis[4 + i])
    decoder[10:] = rng.normal(size=(10, D))
    return decoder, planted_cos


def test_proximity_recovers_planted_cosines():
    decoder, planted_cos = planted()
    prox = geometry.proximity(decoder, np.arange(4, 10), [0, 1, 2, 3], k=1)
    np.testing.assert_allclose(np.asarray(prox), planted_cos, atol=1e-6)
    # k=2: the planted cosine and the other toxic features (0, by orthogonality).
    np.testing.assert_allclose(np.asarray(geometry.proximity(decoder, np.arange(4, 10), [0, 1, 2, 3], k=2)),
                               planted_cos / 2, atol=1e-6)  # fmt: skip


@pytest.mark.parametrize("k", [1, 3])
def test_proximity_never_counts_a_feature_against_itself(k):
    rng = np.random.default_rng(1)
    decoder = rng.normal(size=(40, D))
    sources, toxic = np.array([0, 3, 5, 7, 20, 31]), np.array([3, 5, 9, 11, 20, 33, 38])
    ours = geometry.proximity(decoder, sources, toxic, k=k)
    np.testing.assert_allclose(np.asarray(ours), oracle_proximity(decoder, sources, toxic, k), atol=1e-6)
    p = geometry.feature_proximity(decoder, sources, toxic, k=k)
    assert p.summary()["toxic_features_in_set"] == [3, 5, 20]
    c = cosines(decoder)
    pairs = [c[s, t] for s in sources for t in toxic if s != t]
    np.testing.assert_allclose(p.aggregate("mean_pairwise"), np.mean(pairs), atol=1e-6)
    np.testing.assert_allclose(
        p.aggregate("max"), max(np.max(c[s, [t for t in toxic if t != s]]) for s in sources), atol=1e-6
    )
    np.testing.assert_allclose(
        p.aggregate("mean_of_max"), oracle_proximity(decoder, sources, toxic, k).mean(), atol=1e-6
    )


def test_dead_rows_are_masked_and_counted_never_nan():
    decoder, planted_cos = planted()
    decoder[6] = 0.0  # a dead source
    decoder[2] = 0.0  # a dead toxic feature
    prox = geometry.proximity(decoder, np.arange(4, 10), [0, 1, 2, 3])
    assert isinstance(prox, np.ma.MaskedArray) and list(prox.mask) == [False, False, True, False, False, False]
    assert not np.isnan(prox.data).any()
    np.testing.assert_allclose(prox.compressed(), planted_cos[[0, 1, 3, 4, 5]], atol=1e-6)
    summary = geometry.feature_proximity(decoder, np.arange(4, 10), [0, 1, 2, 3]).summary()
    assert summary["dead_features"] == 1 and summary["dead_toxic"] == 1
    assert all(np.isfinite(summary[h]) for h in geometry.AGGREGATIONS)


def test_permutation_p_values_are_uniform_under_the_null():
    rng = np.random.default_rng(2)
    decoder = rng.normal(size=(300, D))
    toxic = np.arange(20)
    p_values = []
    for _ in range(150):
        a, b = np.split(rng.choice(np.arange(20, 300), 30, replace=False), 2)
        result = geometry.permutation_test(decoder, a, b, toxic, permutations=199, seed=int(rng.integers(1 << 30)))
        p_values.append(result["p_value"])
    assert scipy.stats.kstest(p_values, "uniform").pvalue > 1e-3


def test_permutation_test_detects_a_planted_effect():
    rng = np.random.default_rng(3)
    decoder = rng.normal(size=(200, D))
    toxic = np.arange(10)
    near = np.arange(10, 30)
    for i in near:  # cosine ~0.7 with a toxic feature
        decoder[i] = 0.7 * unit(decoder[i % 10]) + 0.3 * unit(decoder[i])
    far = np.arange(100, 120)
    result = geometry.permutation_test(decoder, near, far, toxic, permutations=2000)
    prox_near = oracle_proximity(decoder, near, toxic, 1)
    prox_far = oracle_proximity(decoder, far, toxic, 1)
    np.testing.assert_allclose(result["effect"], prox_near.mean() - prox_far.mean(), atol=1e-6)
    assert result["p_value"] == 1 / 2001  # no relabelling beats the observed split
    reverse = geometry.permutation_test(decoder, far, near, toxic, permutations=2000)
    assert reverse["p_value"] == 1.0


def test_frequency_matched_null():
    rng = np.random.default_rng(4)
    decoder = rng.normal(size=(400, D))
    toxic = np.arange(10)
    density = rng.random(400) * 0.01
    frequent = np.arange(360, 400)  # the top decile fires most and lies close to the toxic set
    density[frequent] += 0.5
    for i in frequent:
        decoder[i] = unit(decoder[i % 10]) + 0.5 * unit(decoder[i])
    sources = rng.choice(frequent, 15, replace=False)
    null = geometry.frequency_matched_null(decoder, sources, toxic, density, draws=300, seed=0)
    # Matched on density, the null draws from the same close decile: no evidence.
    assert null["p_value"] > 0.05
    np.testing.assert_allclose(null["null_mean"], oracle_proximity(decoder, frequent, toxic, 1).mean(), atol=0.02)
    rare_close = np.arange(10, 25)  # close to the toxic set but in the low deciles: significant
    for i in rare_close:
        decoder[i] = unit(decoder[i % 10]) + 0.5 * unit(decoder[i])
    assert geometry.frequency_matched_null(decoder, rare_close, toxic, density, draws=300)["p_value"] < 0.01


def test_bootstrap_intervals():
    rng = np.random.default_rng(5)
    v = rng.normal(1.0, 2.0, 400)
    lo, hi = geometry.bootstrap_ci(v, resamples=4000)
    assert lo < v.mean() < hi
    np.testing.assert_allclose(hi - lo, 2 * 1.96 * v.std() / np.sqrt(len(v)), rtol=0.15)
    lo, hi = geometry.bootstrap_difference_ci(v, v - 0.5, resamples=4000)
    assert lo < 0.5 < hi


def brute_neighbours(a, b, k, exclude_self):
    c = np.asarray(a, np.float64) @ np.asarray(b, np.float64).T
    c /= np.linalg.norm(a, axis=1)[:, None] * np.linalg.norm(b, axis=1)[None]
    if exclude_self:
        np.fill_diagonal(c, -np.inf)
    order = np.argsort(-c, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(c, order, 1), order


@pytest.mark.parametrize("sharded", [False, True])
def test_neighbour_index_matches_brute_force(sharded):
    rng = np.random.default_rng(6)
    decoder = rng.normal(size=(130, D))
    mesh = distributed.make_mesh(data=2, fsdp=1, tensor=4) if sharded else None
    values, ids = geometry.neighbours(decoder, k=5, mesh=mesh)
    ref_v, ref_i = brute_neighbours(decoder, decoder, 5, True)
    np.testing.assert_allclose(values, ref_v, atol=1e-5)
    np.testing.assert_array_equal(ids[:, 0], ref_i[:, 0])
    assert not (ids == np.arange(130)[:, None]).any()
    other = rng.normal(size=(70, D))
    values, ids = geometry.cross_neighbours(decoder, other, k=3, mesh=mesh)
    ref_v, ref_i = brute_neighbours(decoder, other, 3, False)
    np.testing.assert_allclose(values, ref_v, atol=1e-5)
    np.testing.assert_array_equal(ids[:, 0], ref_i[:, 0])


def test_neighbours_skip_dead_rows():
    rng = np.random.default_rng(7)
    decoder = rng.normal(size=(30, D))
    decoder[[4, 9]] = 0.0
    values, ids = geometry.neighbours(decoder, k=4)
    assert (ids[[4, 9]] == -1).all() and (values[[4, 9]] == 0).all()
    assert not np.isin(ids, [4, 9]).any()


def test_cli_neighbours_across_two_saes(tmp_path, capsys):
    paths = []
    for seed in (0, 1):
        sae = emjax.sae.ReLUSAE(D, 40, rngs=nnx.Rngs(seed))
        emjax.sae.save(sae, tmp_path / f"sae{seed}")
        paths.append(str(tmp_path / f"sae{seed}"))
    out = tmp_path / "nb.safetensors"
    assert geometry.main(["neighbours", *paths, "--k=3", f"--out={out}", "--show=2"]) == 0
    import safetensors.numpy

    saved = safetensors.numpy.load_file(str(out))
    a = np.asarray(emjax.sae.load(paths[0]).W_dec[...])
    b = np.asarray(emjax.sae.load(paths[1]).W_dec[...])
    ref_v, _ = brute_neighbours(a, b, 3, False)
    np.testing.assert_allclose(saved["values"], ref_v, atol=1e-5)
    np.testing.assert_array_equal(
        geometry.sae_directions(emjax.sae.load(paths[0]), "encoder"), np.asarray(emjax.sae.load(paths[0]).W_enc[...]).T
    )
    printed = capsys.readouterr().out
    assert printed.startswith("| feature | neighbours (cosine) |") and len(printed.splitlines()) == 4


# ---------------------------------------------------------------------------- the selection permutation test


def numpy_selection(pos, neg, top_n, eligible=None):
    """The paper's rule by hand: per-feature Pearson correlation with the 0/1 label (np.corrcoef), the top_n
    positive and the top_n negative (ties to the lower id), ineligible features left out."""
    x = np.concatenate([pos, neg]).astype(np.float64)
    y = np.r_[np.ones(len(pos)), np.zeros(len(neg))]
    r = np.array([np.corrcoef(x[:, j], y)[0, 1] if x[:, j].std() > 0 else 0.0 for j in range(x.shape[1])])
    if eligible is not None:
        r = np.where(eligible, r, 0.0)
    ids = np.arange(len(r))
    pos_ids = [j for j in sorted(ids, key=lambda j: (-r[j], j)) if r[j] > 0][:top_n]
    neg_ids = [j for j in sorted(ids, key=lambda j: (r[j], j)) if r[j] < 0][:top_n]
    return np.array(pos_ids, int), np.array(neg_ids, int)


def sparse_codes(rng, n, d, rate=0.25):
    return rng.exponential(size=(n, d)) * (rng.random((n, d)) < rate)


def as_sample_codes(x):
    from emjax.feature_stats import SampleCodes

    width = int((x != 0).sum(1).max())
    order = np.argsort(-x, axis=1, kind="stable")[:, :width]
    return SampleCodes(np.take_along_axis(x, order, 1).astype(np.float32), order.astype(np.int32), x.shape[1])


def test_selection_test_effect_equals_numpy_selection_and_proximity():
    rng = np.random.default_rng(10)
    pos, neg = sparse_codes(rng, 40, 80), sparse_codes(rng, 30, 80)
    pos[:, 5:15] += rng.exponential(size=(40, 10))  # features 5..14 tied to the positive samples
    decoder, toxic = rng.normal(size=(80, D)), np.arange(10, 30)  # 10..14 are also toxic features
    density = rng.uniform(0, 0.3, 80)
    result = geometry.selection_permutation_test(pos, neg, decoder, toxic, top_n=12, permutations=50, seed=3,
                                                 max_density=0.2, density=density)  # fmt: skip
    a, b = numpy_selection(pos, neg, 12, density <= 0.2)
    assert result["selected"] == {"inducing": list(a), "control": list(b)}
    for k in (1, 2):
        r = geometry.selection_permutation_test(pos, neg, decoder, toxic, top_n=12, k=k, permutations=20,
                                                max_density=0.2, density=density)  # fmt: skip
        expected = oracle_proximity(decoder, a, toxic, k).mean() - oracle_proximity(decoder, b, toxic, k).mean()
        assert r["effect"] == pytest.approx(expected, rel=1e-6)
    c = cosines(decoder)
    pair = lambda ids: np.mean([c[i, t] for i in ids for t in toxic if t != i])  # noqa: E731
    assert result["aggregations"]["mean_pairwise"]["effect"] == pytest.approx(pair(a) - pair(b), rel=1e-6)
    best = lambda ids: max(c[i, t] for i in ids for t in toxic if t != i)  # noqa: E731
    assert result["aggregations"]["max"]["effect"] == pytest.approx(best(a) - best(b), rel=1e-6)
    unshared_a, unshared_b = np.setdiff1d(a, toxic), np.setdiff1d(b, toxic)
    expected = oracle_proximity(decoder, unshared_a, toxic, 1).mean()
    expected -= oracle_proximity(decoder, unshared_b, toxic, 1).mean()
    assert result["without_shared"]["mean_of_max"]["effect"] == pytest.approx(expected, rel=1e-6)
    overlap = result["overlap"]
    assert overlap["inducing"] == len(np.intersect1d(a, toxic)) and overlap["control"] == len(np.intersect1d(b, toxic))
    eligible = int((density <= 0.2).sum())
    marked = int((density[toxic] <= 0.2).sum())
    expected_p = scipy.stats.hypergeom(eligible, marked, len(a)).sf(overlap["inducing"] - 1)
    assert overlap["hypergeometric"]["inducing"]["p_greater"] == pytest.approx(expected_p, rel=1e-9)
    # Sparse codes select and test the same.
    sparse = geometry.selection_permutation_test(as_sample_codes(pos), as_sample_codes(neg), decoder, toxic,
                                                 top_n=12, permutations=50, seed=3, max_density=0.2, density=density)
    assert sparse["effect"] == pytest.approx(result["effect"], rel=1e-6)
    assert sparse["p_two_sided"] == pytest.approx(result["p_two_sided"], rel=1e-9)


def null_dataset(rng, d=40, n=16):
    """Samples of both labels from one distribution, with features that move together (shared factors),
    and toxic features among them: the setting where relabelling features is not a valid null."""
    factor = rng.exponential(size=(2 * n, 4))
    loading = (rng.random((4, d)) < 0.3) * rng.uniform(0.5, 1.5, (4, d))
    x = (factor @ loading) * (rng.random((2 * n, d)) < 0.6) + sparse_codes(rng, 2 * n, d, 0.2)
    decoder = rng.normal(size=(d, 8))
    decoder[:, 0] += 2 * loading[0]  # features driven by factor 0 share a direction, and some are toxic
    return x[:n], x[n:], decoder, np.flatnonzero(loading[0] > 0)[:6]


def test_selection_test_p_values_are_uniform_under_the_null():
    rng = np.random.default_rng(11)
    greater, two_sided, crossfit = [], [], []
    for i in range(120):
        pos, neg, decoder, toxic = null_dataset(rng)
        if len(toxic) < 3:
            continue
        r = geometry.selection_permutation_test(pos, neg, decoder, toxic, top_n=5, permutations=99, seed=i)
        greater.append(r["p_greater"])
        two_sided.append(r["p_two_sided"])
        if i % 2 == 0:
            halves = (np.arange(len(pos)) % 2, np.arange(len(neg)) % 2)
            c = geometry.selection_tests(pos, neg, {"decoder": decoder}, toxic, top_n=5, permutations=99, seed=i,
                                         halves=halves)  # fmt: skip
            crossfit.append(c["directions"]["decoder"]["with_shared"]["mean_of_max"]["p_two_sided"])
    for p in (greater, two_sided, crossfit):
        p = np.array([v for v in p if v is not None])
        assert len(p) > 40
        assert scipy.stats.kstest(p, "uniform").pvalue > 1e-3
        # Coverage at the usual level: a valid test rejects about 5% (binomial 99.9% bound), never much more.
        assert np.mean(p <= 0.05) <= 0.05 + 3.3 * np.sqrt(0.05 * 0.95 / len(p))


def test_selection_test_finds_a_planted_effect_and_its_reverse():
    rng = np.random.default_rng(12)
    d = 120
    pos, neg = sparse_codes(rng, 30, d), sparse_codes(rng, 30, d)
    pos[:, :10] += rng.exponential(size=(30, 10)) + 1.0  # inducing features 0..9
    neg[:, 10:20] += rng.exponential(size=(30, 10)) + 1.0  # control features 10..19
    decoder, toxic = rng.normal(size=(d, D)), np.arange(100, 110)
    for i in range(10):  # the inducing features lie near toxic features
        decoder[i] = 0.8 * unit(decoder[100 + i]) + 0.2 * unit(decoder[i])
    r = geometry.selection_permutation_test(pos, neg, decoder, toxic, top_n=10, permutations=199, seed=0)
    assert r["effect"] > 0.3 and r["p_greater"] == r["p_two_sided"] == 1 / 200
    flipped = geometry.selection_permutation_test(neg, pos, decoder, toxic, top_n=10, permutations=199, seed=0)
    assert flipped["effect"] == pytest.approx(-r["effect"], rel=1e-9)
    assert flipped["p_greater"] == 1.0 and flipped["p_two_sided"] == 1 / 200
    halves = (np.arange(30) % 2, np.arange(30) % 2)
    c = geometry.selection_tests(pos, neg, {"decoder": decoder}, toxic, top_n=10, permutations=199, halves=halves)
    assert c["directions"]["decoder"]["with_shared"]["mean_of_max"]["p_two_sided"] == 1 / 200


def test_random_max_cosine_matches_simulation():
    rng = np.random.default_rng(13)
    for d, count in ((8, 30), (64, 100)):
        a = rng.normal(size=(3000, d))
        b = rng.normal(size=(3000, count, d))
        cos = np.einsum("nd,ncd->nc", a, b) / np.linalg.norm(a, axis=1)[:, None] / np.linalg.norm(b, axis=2)
        best = cos.max(1)
        ref = geometry.random_max_cosine(d, count)
        assert ref["mean"] == pytest.approx(best.mean(), rel=0.02)
        assert ref["sd"] == pytest.approx(best.std(), rel=0.08)
        assert np.mean(best > ref["q99"]) == pytest.approx(0.01, abs=0.007)
    # A random dictionary looks random; one with planted near-duplicates does not.
    random_dict = rng.normal(size=(500, 32))
    nearest = geometry.neighbours(random_dict, k=1)[0][:, 0]
    assert geometry.dictionary_structure(nearest, 32)["like_random"]
    structured = np.repeat(rng.normal(size=(250, 32)), 2, 0) + 0.1 * rng.normal(size=(500, 32))
    nearest = geometry.neighbours(structured, k=1)[0][:, 0]
    assert not geometry.dictionary_structure(nearest, 32)["like_random"]


def test_the_effect_interval_resamples_the_samples_and_selects_again():
    rng = np.random.default_rng(14)
    d = 120
    pos, neg = sparse_codes(rng, 30, d), sparse_codes(rng, 30, d)
    pos[:, :10] += rng.exponential(size=(30, 10)) + 1.0
    neg[:, 10:20] += rng.exponential(size=(30, 10)) + 1.0
    decoder, toxic = rng.normal(size=(d, D)), np.arange(100, 110)
    for i in range(10):
        decoder[i] = 0.8 * unit(decoder[100 + i]) + 0.2 * unit(decoder[i])
    ci = geometry.selection_bootstrap(pos, neg, {"decoder": decoder}, toxic, top_n=10, resamples=100)["decoder"]
    effect = geometry.selection_permutation_test(pos, neg, decoder, toxic, top_n=10, permutations=20)["effect"]
    assert 0 < ci["mean_of_max"][0] <= effect <= ci["mean_of_max"][1]
    # Reversed labels: the interval of the reversed effect, below zero.
    flipped = geometry.selection_bootstrap(neg, pos, {"decoder": decoder}, toxic, top_n=10, resamples=100)
    assert flipped["decoder"]["mean_of_max"][1] < 0


def test_selection_test_over_eight_devices_equals_one():
    rng = np.random.default_rng(15)
    pos, neg = sparse_codes(rng, 20, 60), sparse_codes(rng, 24, 60)
    decoder, toxic = rng.normal(size=(60, D)), np.arange(10)
    mesh = distributed.make_mesh(data=8)
    one = geometry.selection_permutation_test(pos, neg, decoder, toxic, top_n=6, permutations=300, seed=2)
    eight = geometry.selection_permutation_test(pos, neg, decoder, toxic, top_n=6, permutations=300, seed=2, mesh=mesh)
    for key in ("effect", "p_greater", "p_two_sided", "null_mean", "null_sd"):
        assert eight[key] == pytest.approx(one[key], rel=1e-6)
