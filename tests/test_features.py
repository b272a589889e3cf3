"""Feature selection against scipy / numpy formulas, on dense and sparse codes, and on planted features."""

import jax.numpy as jnp
import numpy as np
import pytest
import scipy.stats

import emjax.models
from emjax import features
from emjax.feature_stats import LayerStats, SampleCodes

D = 60


def sparse(x, k):
    """The top-k entries of each row, as the streaming pass stores them (k = D keeps everything)."""
    idx = np.argsort(-x, axis=1, kind="stable")[:, :k].astype(np.int32)
    return SampleCodes(np.take_along_axis(x, idx, 1).astype(np.float32), idx, x.shape[1])


def codes(rng, n, planted=(), scale=2.0):
    x = np.maximum(rng.normal(size=(n, D)), 0) * (rng.random((n, D)) < 0.3)
    x[:, list(planted)] += scale * rng.random((n, len(planted)))
    return x.astype(np.float32)


def test_label_correlation_is_the_point_biserial_correlation():
    rng = np.random.default_rng(0)
    pos, neg = codes(rng, 40), codes(rng, 55)
    pos[:, 3] = neg[:, 3] = 0.7  # constant over both sets
    ours = features.label_correlation(pos, neg)
    x = np.concatenate([pos, neg]).astype(np.float64)
    label = np.r_[np.ones(40), np.zeros(55)]
    for j in range(D):
        if j == 3:
            assert ours[j] == 0.0
        else:
            np.testing.assert_allclose(ours[j], scipy.stats.pointbiserialr(label, x[:, j])[0], atol=1e-9)
    np.testing.assert_allclose(features.label_correlation(sparse(pos, D), sparse(neg, D)), ours, atol=1e-6)


def test_effect_size_score_correlation_and_model_diff_match_numpy():
    rng = np.random.default_rng(1)
    pos, neg = codes(rng, 30), codes(rng, 45)
    a, b = pos.astype(np.float64), neg.astype(np.float64)
    pooled = np.sqrt(((len(a) - 1) * a.var(0, ddof=1) + (len(b) - 1) * b.var(0, ddof=1)) / (len(a) + len(b) - 2))
    expected = np.divide(a.mean(0) - b.mean(0), pooled, out=np.zeros(D), where=pooled > 0)
    np.testing.assert_allclose(features.effect_size(pos, neg), expected, atol=1e-9)
    np.testing.assert_allclose(features.effect_size(sparse(pos, D), sparse(neg, D)), expected, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(features.mean_difference(pos, neg), a.mean(0) - b.mean(0), atol=1e-9)

    score = rng.random(30)
    expected = np.array([np.corrcoef(a[:, j], score)[0, 1] if a[:, j].std() > 0 else 0.0 for j in range(D)])
    np.testing.assert_allclose(features.score_correlation(pos, score), expected, atol=1e-9)
    np.testing.assert_allclose(features.score_correlation(sparse(pos, D), score), expected, rtol=1e-5, atol=1e-5)

    base = codes(rng, 30)
    d = a - base.astype(np.float64)
    np.testing.assert_allclose(features.model_diff(pos, base), d.mean(0), atol=1e-9)
    z = np.divide(d.mean(0), d.std(0), out=np.zeros(D), where=d.std(0) > 0)
    np.testing.assert_allclose(features.model_diff(pos, base, standardize=True), z, atol=1e-9)
    # Sparse rows with different kept features still pair up by (row, feature).
    np.testing.assert_allclose(features.model_diff(sparse(pos, 25), sparse(base, 20)),
                               (sparse(pos, 25).dense() - sparse(base, 20).dense()).mean(0), atol=1e-6)  # fmt: skip
    np.testing.assert_allclose(features.model_diff(sparse(pos, D), base, standardize=True), z, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("method", ["correlation", "mean_difference", "effect_size", "frequency_difference"])
def test_selection_recovers_planted_features(method):
    rng = np.random.default_rng(2)
    up, down = [5, 17, 42], [8, 33]
    pos, neg = codes(rng, 80, planted=up), codes(rng, 90, planted=down)

    # Token statistics where the planted features fire more often on their side.
    def stats(planted):
        fire = rng.integers(0, 20, D)
        fire[planted] += 200
        return LayerStats(1000, fire, np.zeros(D), np.zeros(D), np.zeros(D, np.float32), 0.0, np.zeros(4), 0.0)

    s_pos, s_neg = stats(up), stats(down)
    scores = features.contrast(method, sparse(pos, 16), sparse(neg, 16), pos_stats=s_pos, neg_stats=s_neg)
    chosen = features.top_features(scores, 3)
    assert sorted(chosen["positive"]) == up
    assert sorted(chosen["negative"][:2]) == down
    assert np.all(np.diff(scores[chosen["positive"]]) <= 0) and np.all(np.diff(scores[chosen["negative"]]) >= 0)


def test_dense_features_are_excluded_and_densities_reported():
    scores = np.array([0.9, 0.8, 0.0, -0.5, -0.7, 0.3])
    density = np.array([0.5, 0.01, 0.0, 0.02, 0.9, 0.001])
    chosen = features.top_features(scores, 2, density=density, max_density=0.1)
    assert list(chosen["positive"]) == [1, 5] and list(chosen["negative"]) == [3]
    assert chosen["excluded_dense"] == 2
    s = LayerStats(100, np.array([50, 1, 0, 2, 90, 0]), np.arange(6.0), np.zeros(6), np.arange(6, dtype=np.float32),
                   0.0, np.zeros(2), 0.0)  # fmt: skip
    (record,) = features.feature_records([1], scores, {"inducing": s})
    expected = {"density": 0.01, "fire_count": 1, "mean": 0.01, "max": 1.0}
    assert record == {"feature": 1, "score": 0.8, "datasets": {"inducing": expected}}
    with pytest.raises(ValueError, match="needs the features' density"):
        features.top_features(scores, 2, max_density=0.1)


def test_mismatched_shapes_are_errors():
    with pytest.raises(ValueError, match="pos has 4 features, neg has 5"):
        features.label_correlation(np.zeros((3, 4)), np.zeros((3, 5)))
    with pytest.raises(ValueError, match="unknown contrast"):
        features.contrast("nope", np.zeros((3, 4)), np.zeros((3, 4)))


class Vocabulary:
    def decode(self, ids):
        return "".join(f"<{i}>" for i in ids)


@pytest.mark.parametrize("tied", [True, False])
def test_logit_lens_matches_numpy(tied):
    arch = dict(
        model_type="gemma2", vocab_size=50, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
        num_attention_heads=2, num_key_value_heads=1, head_dim=8, sliding_window=4, query_pre_attn_scalar=8,
        tie_word_embeddings=tied, final_logit_softcapping=30.0,
    )  # fmt: skip
    model = emjax.models.build(arch, seed=0, dtype="float32")
    rng = np.random.default_rng(3)
    model.final_norm.weight.set_value(jnp.asarray(rng.normal(size=16), jnp.float32))
    rows = rng.normal(size=(4, 16)) * np.array([[0.01], [1.0], [30.0], [0.0]])
    out = features.logit_lens(model, rows, top=5, tokenizer=Vocabulary())
    gain = 1.0 + np.asarray(model.final_norm.weight[...], np.float64)  # Gemma's (1 + w) norm
    head = np.asarray(model.embed[...], np.float64).T if tied else np.asarray(model.head[...], np.float64)
    for i in range(3):
        logits = (rows[i] / np.sqrt(np.mean(rows[i] ** 2)) * gain) @ head
        logits = 30.0 * np.tanh(logits / 30.0)  # Gemma-2's final soft-cap
        np.testing.assert_allclose(out["top_logits"][i], np.sort(logits)[::-1][:5], rtol=1e-4, atol=1e-4)
        np.testing.assert_allclose(out["bottom_logits"][i], np.sort(logits)[:5], rtol=1e-4, atol=1e-4)
        np.testing.assert_allclose(logits[out["top_ids"][i]], out["top_logits"][i], rtol=1e-4, atol=1e-4)
    np.testing.assert_array_equal(out["top_logits"][3], 0.0)  # a dead row
    assert out["top_tokens"][1] == [f"<{i}>" for i in out["top_ids"][1]]
