"""Brute-force top-k oracle for the similarity tests (test_similarity, test_accelerator).

The oracle computes the full similarity matrix in float64 and orders each row
by (value descending, key index ascending). Random float inputs are compared
within dtype tolerance, with indices compared only where the oracle's gap to
the neighbouring values exceeds that tolerance; small-integer inputs make every
product exact in fp32 (and bf16), so there ties and indices are compared exactly.
"""

import ml_dtypes
import numpy as np

# bf16: inputs rounded to 8 mantissa bits give cosine errors of ~1.5e-3 at these sizes.
TOLERANCE = {np.float32: 1e-5, ml_dtypes.bfloat16: 4e-3}


def oracle(queries, keys, normalize=True):
    q = np.asarray(queries, np.float64)
    kk = np.asarray(keys, np.float64)
    if normalize:
        # The documented zero-vector rule: a zero vector has cosine 0 with everything.
        q = q / np.where((n := np.linalg.norm(q, axis=1, keepdims=True)) > 0, n, 1)
        kk = kk / np.where((n := np.linalg.norm(kk, axis=1, keepdims=True)) > 0, n, 1)
    sims = q @ kk.T
    order = np.argsort(-sims, axis=1, kind="stable")  # stable: equal values keep the lower index first
    return np.take_along_axis(sims, order, axis=1), order, sims


def assert_matches(result, expected, k, tol):
    values, indices = (np.asarray(x) for x in result)
    sims, order, matrix = expected
    assert values.shape == indices.shape == (sims.shape[0], k)
    assert values.dtype == np.float32 and indices.dtype == np.int32
    np.testing.assert_allclose(values, sims[:, :k], atol=tol, rtol=0)
    # An index is determined only where its value is separated from both neighbours.
    padded = np.concatenate([np.full((sims.shape[0], 1), np.inf), sims], axis=1)
    gap_before = padded[:, :k] - padded[:, 1 : k + 1]
    gap_after = sims[:, :k] - (sims[:, 1 : k + 1] if sims.shape[1] > k else np.full_like(sims[:, :k], -np.inf))
    certain = (gap_before > 2 * tol) & (gap_after > 2 * tol)
    assert certain.sum() >= sims.shape[0] // 2, "test inputs too tie-heavy to check indices"
    np.testing.assert_array_equal(indices[certain], order[:, :k][certain])
    # The returned indices must hold the returned values, wherever they are.
    np.testing.assert_allclose(np.take_along_axis(matrix, indices, axis=1), values, atol=tol)


def random_pair(rng, n, m, d, dtype=np.float32):
    return rng.standard_normal((n, d)).astype(dtype), rng.standard_normal((m, d)).astype(dtype)


def integer_pair(rng, n, m, d):
    """Entries in {-2..2}: every dot product is exact in fp32, and values collide often."""
    return (rng.integers(-2, 3, (n, d)).astype(np.float32), rng.integers(-2, 3, (m, d)).astype(np.float32))
