"""Choosing SAE features: contrasts of two datasets, correlation with a score, model diffing, the logit lens.

Inputs are sample-pooled SAE codes, either dense [N, d_sae] arrays or the
sparse `SampleCodes` that `emjax.feature_stats.stream_features` writes (all
moments are computed from the sparse entries, so a 1M-feature dictionary
never needs a dense matrix), and the token-level `LayerStats` of each dataset.

    scores = label_correlation(inducing_codes, control_codes)           # the paper's rule
    chosen = top_features(scores, 100, density=combined_density(s_ind, s_ctl), max_density=0.01)
    chosen["positive"]  # inducing features;  chosen["negative"]: control features
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from emjax.feature_stats import LayerStats, SampleCodes, sample_codes

CONTRASTS = ("correlation", "mean_difference", "frequency_difference", "effect_size")


def _d_sae(x) -> int:
    return x.d_sae if isinstance(x, SampleCodes) else x.shape[1]


def _sums(x, weights: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Per-feature sum of (weight x value) and of value^2, float64; sparse codes via bincount."""
    if isinstance(x, SampleCodes):
        values = x.values.astype(np.float64)
        index = x.indices.ravel().astype(np.int64)
        w = values if weights is None else values * weights[:, None]
        return (
            np.bincount(index, w.ravel(), minlength=x.d_sae),
            np.bincount(index, (values * values).ravel(), minlength=x.d_sae),
        )
    x = x.astype(np.float64)
    return (x.sum(0) if weights is None else weights @ x), (x * x).sum(0)


def _variance(mean_sq: np.ndarray, mean: np.ndarray) -> np.ndarray:
    """E[x^2] - E[x]^2, with the rounding residue of a constant feature set to exactly 0."""
    var = mean_sq - mean * mean
    return np.where(var > 1e-10 * mean_sq, var, 0.0)


def _check_pair(pos, neg, what: str):
    pos, neg = sample_codes(pos, f"{what} pos"), sample_codes(neg, f"{what} neg")
    if _d_sae(pos) != _d_sae(neg):
        raise ValueError(f"{what}: pos has {_d_sae(pos)} features, neg has {_d_sae(neg)}")
    if not len(pos) or not len(neg):
        raise ValueError(f"{what}: both sides need samples, got {len(pos)} and {len(neg)}")
    return pos, neg


def label_correlation(pos, neg) -> np.ndarray:
    """Point-biserial correlation of each feature with the label (1 for `pos` rows, 0 for `neg` rows).

    pos [N1, d_sae], neg [N2, d_sae] (or SampleCodes); a feature constant over both gets 0.
    """
    pos, neg = _check_pair(pos, neg, "label_correlation")
    n1, n0 = len(pos), len(neg)
    (s1, q1), (s0, q0) = _sums(pos), _sums(neg)
    n = n1 + n0
    var = _variance((q1 + q0) / n, (s1 + s0) / n)
    diff = s1 / n1 - s0 / n0
    std = np.sqrt(var)
    return np.divide(diff * np.sqrt(n1 * n0) / n, std, out=np.zeros_like(diff), where=std > 0)


def mean_difference(pos, neg) -> np.ndarray:
    """Mean pooled activation on `pos` minus on `neg`."""
    pos, neg = _check_pair(pos, neg, "mean_difference")
    return _sums(pos)[0] / len(pos) - _sums(neg)[0] / len(neg)


def effect_size(pos, neg) -> np.ndarray:
    """Cohen's d: the mean difference over the pooled sample standard deviation (0 where that is 0)."""
    pos, neg = _check_pair(pos, neg, "effect_size")
    n1, n0 = len(pos), len(neg)
    if n1 + n0 < 3:
        raise ValueError(f"effect_size: needs at least 3 samples in all, got {n1} + {n0}")
    (s1, q1), (s0, q0) = _sums(pos), _sums(neg)
    m1, m0 = s1 / n1, s0 / n0
    ss = n1 * _variance(q1 / n1, m1) + n0 * _variance(q0 / n0, m0)  # within-group sums of squares
    std = np.sqrt(ss / (n1 + n0 - 2))
    return np.divide(m1 - m0, std, out=np.zeros_like(m1), where=std > 0)


def frequency_difference(pos: LayerStats, neg: LayerStats) -> np.ndarray:
    """Share of counted tokens on which each feature fires, `pos` minus `neg`."""
    if pos.d_sae != neg.d_sae:
        raise ValueError(f"frequency_difference: {pos.d_sae} features against {neg.d_sae}")
    return pos.density - neg.density


def contrast(method: str, pos, neg, *, pos_stats: LayerStats | None = None, neg_stats: LayerStats | None = None):
    """Scores [d_sae] of one of CONTRASTS (frequency_difference reads the token statistics)."""
    if method == "correlation":
        return label_correlation(pos, neg)
    if method == "mean_difference":
        return mean_difference(pos, neg)
    if method == "effect_size":
        return effect_size(pos, neg)
    if method == "frequency_difference":
        if pos_stats is None or neg_stats is None:
            raise ValueError("frequency_difference needs pos_stats and neg_stats (token-level LayerStats)")
        return frequency_difference(pos_stats, neg_stats)
    raise ValueError(f"unknown contrast {method!r}; choose one of {CONTRASTS}")


def score_correlation(codes, scores) -> np.ndarray:
    """Pearson correlation of each feature's pooled activation with a continuous per-sample score (toxicity)."""
    codes = sample_codes(codes, "score_correlation codes")
    s = np.asarray(scores, np.float64)
    if s.shape != (len(codes),):
        raise ValueError(f"score_correlation: {len(codes)} samples but scores of shape {s.shape}")
    n = len(s)
    weighted, sq = _sums(codes, s - s.mean())
    sums, _ = _sums(codes)
    var_x = _variance(sq / n, sums / n)
    std = np.sqrt(var_x * s.var())
    return np.divide(weighted / n, std, out=np.zeros_like(weighted), where=std > 0)


def model_diff(finetuned, base, *, standardize: bool = False) -> np.ndarray:
    """Per feature, the mean over samples of (fine-tuned minus base) pooled activation on the same rows.

    standardize=True divides by the standard deviation of the paired differences (0 where that is 0).
    """
    finetuned, base = _check_pair(finetuned, base, "model_diff")
    if len(finetuned) != len(base):
        raise ValueError(f"model_diff: paired rows needed, got {len(finetuned)} fine-tuned and {len(base)} base")
    d_sae, n = _d_sae(base), len(base)
    if isinstance(finetuned, SampleCodes) or isinstance(base, SampleCodes):
        feature, diff = _sparse_difference(_to_sparse(finetuned), _to_sparse(base), d_sae)
        total = np.bincount(feature, diff, minlength=d_sae)
        total_sq = np.bincount(feature, diff * diff, minlength=d_sae)
    else:
        d = finetuned.astype(np.float64) - base.astype(np.float64)
        total, total_sq = d.sum(0), (d * d).sum(0)
    mean = total / n
    if not standardize:
        return mean
    std = np.sqrt(_variance(total_sq / n, mean))
    return np.divide(mean, std, out=np.zeros_like(mean), where=std > 0)


def _to_sparse(x) -> SampleCodes:
    if isinstance(x, SampleCodes):
        return x
    return SampleCodes(
        x.astype(np.float32), np.broadcast_to(np.arange(x.shape[1], dtype=np.int32), x.shape), x.shape[1]
    )


def _sparse_difference(a: SampleCodes, b: SampleCodes, d_sae: int):
    """(feature id, a - b) of every (row, feature) entry present in a or b, duplicates summed."""
    rows = lambda c: np.repeat(np.arange(len(c), dtype=np.int64), c.values.shape[1])  # noqa: E731
    keys = np.concatenate([rows(a) * d_sae + a.indices.ravel(), rows(b) * d_sae + b.indices.ravel()])
    values = np.concatenate([a.values.ravel(), -b.values.ravel()]).astype(np.float64)
    unique, inverse = np.unique(keys, return_inverse=True)
    return (unique % d_sae).astype(np.int64), np.bincount(inverse.ravel(), values, minlength=len(unique))


# ---------------------------------------------------------------------------- choosing


def combined_density(*stats: LayerStats) -> np.ndarray:
    """Share of all counted tokens (over every given dataset) on which each feature fires."""
    tokens = sum(s.tokens for s in stats)
    return sum(s.fire_count for s in stats) / max(tokens, 1)


def top_features(scores, n: int, *, density=None, max_density: float | None = None) -> dict:
    """The `n` highest-scoring features (`positive`, score > 0, descending) and the `n` lowest
    (`negative`, score < 0, ascending); ties go to the lower feature id.

    Features firing on more than `max_density` of tokens (dense features) are excluded.
    """
    scores = np.asarray(scores, np.float64)
    if n < 1:
        raise ValueError(f"top_features: n must be positive, got {n}")
    excluded = np.zeros(scores.shape, bool)
    if max_density is not None:
        if density is None:
            raise ValueError("top_features: max_density needs the features' density")
        density = np.asarray(density)
        if density.shape != scores.shape:
            raise ValueError(f"top_features: density {density.shape} does not match scores {scores.shape}")
        excluded = density > max_density
    usable = ~excluded & np.isfinite(scores)
    ids = np.arange(len(scores))
    pos = ids[usable & (scores > 0)]
    neg = ids[usable & (scores < 0)]
    pos = pos[np.lexsort((pos, -scores[pos]))][:n]
    neg = neg[np.lexsort((neg, scores[neg]))][:n]
    return {"positive": pos, "negative": neg, "excluded_dense": int(excluded.sum())}


def feature_records(features: Sequence[int], scores, stats: Mapping[str, LayerStats]) -> list[dict]:
    """For each feature: its score and, per named dataset, firing density, mean and max activation."""
    scores = np.asarray(scores)
    return [
        {
            "feature": int(j),
            "score": float(scores[j]),
            "datasets": {
                name: {
                    "density": float(s.density[j]),
                    "fire_count": int(s.fire_count[j]),
                    "mean": float(s.mean[j]),
                    "max": float(s.max[j]),
                }
                for name, s in stats.items()
            },
        }
        for j in features
    ]


# ---------------------------------------------------------------------------- what a feature means


def logit_lens(model, directions, *, top: int = 10, tokenizer=None) -> dict:
    """Each direction [n, d_model] (decoder rows) read as a final residual: the model's own final norm,
    then the unembedding (and its logit soft-cap). Returns top/bottom token ids and logits [n, top],
    and their strings when a tokenizer is given. Zero rows give zero logits.
    """
    d = jnp.asarray(directions, jnp.float32)
    cfg = model.config
    if d.ndim != 2 or d.shape[1] != cfg.hidden_size:
        raise ValueError(f"logit_lens: directions must be [n, {cfg.hidden_size}], got {tuple(d.shape)}")
    # RMSNorm is scale-free up to its eps: give each row unit RMS so eps cannot matter.
    norm = jnp.linalg.norm(d, axis=1, keepdims=True)
    d = jnp.where(norm > 0, d / jnp.where(norm > 0, norm, 1) * np.sqrt(cfg.hidden_size), 0.0)
    x = model.final_norm(d.astype(model.dtype))
    table = model.embed[...]
    head = table.T if cfg.tie_word_embeddings else model.head[...]
    logits = model.cap_logits(jnp.matmul(x, head, preferred_element_type=jnp.float32))
    logits = jnp.where(norm > 0, logits, 0.0)
    top = min(top, logits.shape[1])
    top_values, top_ids = jax.lax.top_k(logits, top)
    bottom_values, bottom_ids = jax.lax.top_k(-logits, top)
    out = {
        "top_ids": np.asarray(top_ids),
        "top_logits": np.asarray(top_values),
        "bottom_ids": np.asarray(bottom_ids),
        "bottom_logits": -np.asarray(bottom_values),
    }
    if tokenizer is not None:
        for side in ("top", "bottom"):
            out[f"{side}_tokens"] = [[tokenizer.decode([int(i)]) for i in row] for row in out[f"{side}_ids"]]
    return out
