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


def test_plots_and_markdown(tmp_path):
    rows = [
        {"layer": 3, "inducing": (0.3, 0.25, 0.35), "control": (0.2, 0.15, 0.24), "null": (0.18, 0.1, 0.2)},
        {"layer": 6, "inducing": (0.25, 0.2, 0.3), "control": (0.22, 0.2, 0.25), "null": (0.19, 0.1, 0.2)},
    ]
    geometry.plot_layer_proximity(rows, tmp_path / "layers.png", title="t")
    groups = {"inducing": np.random.rand(50), "control": np.ma.masked_array([0.1, 0.2], [0, 1])}
    geometry.plot_max_cosine_histograms(groups, tmp_path / "hist.png")
    for name in ("layers.png", "hist.png"):
        assert (tmp_path / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    table = geometry.markdown_table(
        [{"layer": 3, "effect": 0.12345, "set": "a|b"}, {"layer": 6, "effect": float("nan"), "set": "c"}]
    )
    assert table == "| layer | effect | set |\n|---:|---:|---|\n| 3 | 0.123 | a\\|b |\n| 6 | n/a | c |\n"
