"""An SAE's quality on held-out activations, as the sae stage reports it."""

from __future__ import annotations

import logging

import numpy as np

HELD_OUT = 0.1  # share of the extracted tokens kept out of SAE training, for its quality


def split(x: np.ndarray, seed: int, share: float = HELD_OUT) -> tuple[np.ndarray, np.ndarray]:
    """(held-out rows: a seeded `share` of `x`, at least one; the rest, to train on)."""
    order = np.random.default_rng(seed).permutation(len(x))
    cut = max(1, int(len(x) * share))
    return x[order[:cut]], x[order[cut:]]


def warn_if_poor(scores: dict, layer: int, fvu_warn: float) -> None:
    """A warning when quality's FVU is above `fvu_warn` (sae.fvu_warn)."""
    if scores["fvu"] is not None and scores["fvu"] > fvu_warn:
        logging.getLogger(__name__).warning(
            "SAE at layer %d explains only %.0f%% of the variance of this model's activations (FVU %.3f > %.3f): "
            "check the layer, the activation function and the base model it was trained on",
            layer, 100 * scores["explained_variance"], scores["fvu"], fvu_warn,
        )  # fmt: skip


def quality(sae, x: np.ndarray, batch: int = 4096) -> dict:
    """L0, FVU (fraction of variance unexplained: total squared error over total variance), FVU per token
    (each token's squared error over its squared distance from the mean, then their mean and median: a
    few high-norm tokens cannot carry it), explained variance and dead fraction on `x`."""
    x = np.asarray(x, np.float32)
    mean = x.astype(np.float64).mean(0)
    sq_err, fired, l0, per_token = 0.0, np.zeros(sae.d_sae, bool), 0.0, []
    for lo in range(0, len(x), batch):
        chunk = x[lo : lo + batch]
        codes = np.asarray(sae.encode(chunk))
        err = ((np.asarray(sae.decode(codes), np.float64) - chunk) ** 2).sum(1)
        spread = ((chunk - mean) ** 2).sum(1)
        sq_err += float(err.sum())
        per_token.append(np.divide(err, spread, out=np.full_like(err, np.nan), where=spread > 0))
        fired |= (codes > 0).any(0)
        l0 += float((codes > 0).sum())
    total = float(((x - mean) ** 2).sum())
    fvu = sq_err / total if total > 0 else None
    per_token = np.concatenate(per_token)
    per_token = per_token[np.isfinite(per_token)]
    return {
        "tokens": len(x),
        "l0": l0 / len(x),
        "fvu": fvu,
        "fvu_per_token_mean": float(per_token.mean()) if len(per_token) else None,
        "fvu_per_token_median": float(np.median(per_token)) if len(per_token) else None,
        "explained_variance": None if fvu is None else 1 - fvu,
        "dead_fraction": float(1 - fired.mean()),
    }
