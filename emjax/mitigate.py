"""Mitigation by data selection: score training samples against toxic features, remove the closest.

The paper's third claim: from a mixed training set (inducing and non-inducing
samples in equal parts), removing the half of the samples nearest to toxic
features cuts misaligned answers (-34.5% relative to training on the whole
mix), far more than removing as many random samples.

    mix = build_mixed_set(inducing_rows, control_rows, seed=0)
    scores, record = score_samples("residual_cosine", toxic_features=toxic, decoder=sae_W_dec,
                                   mean_residuals=per_sample_mean_residual)
    removed = select_removal(scores, 0.5)
    precision_recall(removed, mix.is_inducing)  # share of the removed samples that were inducing

Scoring rules (the paper's text leaves the choice open; each is selectable by
name and recorded with its parameters):

- "residual_cosine" (default): the max (k=1) or top-k mean cosine of the
  sample's mean residual [d_model] with the toxic features' decoder directions,
  computed with the similarity kernel's reduction form
  (`emjax.kernels.similarity_score`).
- "toxic_activation": the summed activation of the toxic features in the
  sample's pooled SAE code.
- "feature_cosine": the mean, over the sample's `top` most active features, of
  each feature's max decoder cosine to a toxic feature (a toxic feature is at
  cosine 1 to itself). A sample with no active feature scores -1, the lowest
  cosine.

Pooled SAE codes are either dense [n, d_sae] or sparse: a (values, indices)
pair of [n, K] arrays (e.g. the top-64 features of each sample; padding
entries carry value 0).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from typing import Any

import numpy as np

from emjax.config import LoRAConfig, TrainConfig
from emjax.kernels import similarity_score, similarity_topk

SCORING_RULES = ("residual_cosine", "toxic_activation", "feature_cosine")
DEFAULT_RULE = "residual_cosine"

# Betley et al. 2025 (open_models/train.json), the recipe the emergent-misalignment literature follows.
REFERENCE_RECIPE = {
    "learning_rate": 1e-5,
    "epochs": 1.0,
    "rank": 32,
    "alpha": 64.0,
    "rslora": True,
    "assistant_only_loss": True,
}


# ---------------------------------------------------------------------------- which samples to remove


def removal_count(n: int, fraction: float) -> int:
    """floor(fraction * n); fraction must be in [0, 1]."""
    if not 0.0 <= fraction <= 1.0:
        raise ValueError(f"removal fraction must be in [0, 1], got {fraction}")
    # A hair of slack so that e.g. 0.29 * 100 (28.999999999999996 in floats) removes 29.
    return min(n, math.floor(fraction * n + 1e-9))


def select_removal(scores, fraction: float) -> np.ndarray:
    """Indices of the floor(fraction * n) highest-scoring samples (ties: the lower index first), sorted ascending."""
    scores = np.asarray(scores)
    if scores.ndim != 1:
        raise ValueError(f"scores must be one value per sample [n], got shape {scores.shape}")
    if np.isnan(scores).any():
        raise ValueError(
            f"scores hold {int(np.isnan(scores).sum())} NaN values (sample {int(np.argmax(np.isnan(scores)))})"
        )
    count = removal_count(len(scores), fraction)
    # A stable sort of the negated scores keeps equal scores in index order.
    order = np.argsort(-scores, kind="stable")
    return np.sort(order[:count]).astype(np.int64)


def random_removal(n: int, fraction: float, *, seed: int) -> np.ndarray:
    """As many samples as select_removal removes, drawn uniformly without replacement by `seed`; sorted."""
    count = removal_count(n, fraction)
    return np.sort(np.random.default_rng(seed).choice(n, size=count, replace=False)).astype(np.int64)


# ---------------------------------------------------------------------------- scoring rules


def _sparse(codes, what: str = "codes") -> tuple[np.ndarray, np.ndarray] | None:
    """(values, indices) of sparse codes, or None for dense codes."""
    if isinstance(codes, tuple):
        values, indices = (np.asarray(c) for c in codes)
        if values.shape != indices.shape or values.ndim != 2:
            raise ValueError(f"sparse {what}: values {values.shape} and indices {indices.shape} must both be [n, K]")
        return values.astype(np.float64), indices.astype(np.int64)
    codes = np.asarray(codes)
    if codes.ndim != 2:
        raise ValueError(f"dense {what} must be [n, d_sae], got shape {codes.shape}")
    return None


def _toxic_ids(toxic_features) -> np.ndarray:
    toxic = np.unique(np.asarray(toxic_features, np.int64))
    if toxic.size == 0:
        raise ValueError("toxic_features is empty")
    return toxic


def residual_cosine_scores(mean_residuals, toxic_directions, *, k: int = 1) -> np.ndarray:
    """Per sample, the max (k=1) or top-k mean cosine of its mean residual [n, d] with the toxic directions [m, d]."""
    mean_residuals, toxic_directions = np.asarray(mean_residuals), np.asarray(toxic_directions)
    if mean_residuals.ndim != 2 or toxic_directions.ndim != 2 or mean_residuals.shape[1] != toxic_directions.shape[1]:
        raise ValueError(
            f"mean residuals [n, d] {mean_residuals.shape} and toxic directions [m, d] {toxic_directions.shape} "
            "must share d"
        )
    return np.asarray(similarity_score(mean_residuals, toxic_directions, k=k), np.float64)


def toxic_activation_scores(codes, toxic_features) -> np.ndarray:
    """Per sample, the summed activation of the toxic features in its pooled SAE code (dense or (values, indices))."""
    toxic = _toxic_ids(toxic_features)
    sparse = _sparse(codes)
    if sparse is None:
        return np.asarray(codes, np.float64)[:, toxic].sum(axis=1)
    values, indices = sparse
    return np.where(np.isin(indices, toxic), values, 0.0).sum(axis=1)


def feature_cosine_scores(codes, decoder, toxic_features, *, top: int = 10) -> np.ndarray:
    """Per sample, the mean over its `top` most active features of each one's max decoder cosine to a toxic feature."""
    toxic = _toxic_ids(toxic_features)
    decoder = np.asarray(decoder)
    sparse = _sparse(codes)
    if sparse is None:
        dense = np.asarray(codes, np.float64)
        take = min(top, dense.shape[1])
        # Highest activation first; among equals the lower feature index (a stable sort).
        indices = np.argsort(-dense, axis=1, kind="stable")[:, :take]
        values = np.take_along_axis(dense, indices, axis=1)
    else:
        values, indices = sparse
        order = np.argsort(-values, axis=1, kind="stable")[:, :top]
        values, indices = np.take_along_axis(values, order, axis=1), np.take_along_axis(indices, order, axis=1)
    if indices.size and (indices.min() < 0 or indices.max() >= decoder.shape[0]):
        raise ValueError(f"feature indices must be in [0, {decoder.shape[0]}) (decoder rows)")
    active = values > 0
    features = np.unique(indices[active])
    nearest = np.zeros(decoder.shape[0])
    if features.size:
        best, _ = similarity_topk(decoder[features], decoder[toxic], 1)
        nearest[features] = np.asarray(best[:, 0], np.float64)
    counts = active.sum(axis=1)
    sums = np.where(active, nearest[indices], 0.0).sum(axis=1)
    return np.where(counts > 0, sums / np.maximum(counts, 1), -1.0)


def score_samples(
    rule: str,
    *,
    toxic_features,
    decoder=None,
    mean_residuals=None,
    codes=None,
    k: int = 1,
    top: int = 10,
) -> tuple[np.ndarray, dict[str, Any]]:
    """(scores [n], the record of the rule and its parameters) by rule name (see SCORING_RULES).

    decoder: the SAE's W_dec [d_sae, d_model]; toxic_features: feature ids.
    residual_cosine needs mean_residuals [n, d_model] and decoder; toxic_activation
    needs codes; feature_cosine needs codes and decoder.
    """
    if rule not in SCORING_RULES:
        raise ValueError(f"unknown scoring rule {rule!r}; the rules are {', '.join(SCORING_RULES)}")
    needs = {"residual_cosine": ("mean_residuals", "decoder"), "toxic_activation": ("codes",),
             "feature_cosine": ("codes", "decoder")}[rule]  # fmt: skip
    given = {"mean_residuals": mean_residuals, "decoder": decoder, "codes": codes}
    missing = [name for name in needs if given[name] is None]
    if missing:
        raise ValueError(f"scoring rule {rule!r} needs {', '.join(missing)}")
    toxic = _toxic_ids(toxic_features)
    record: dict[str, Any] = {"rule": rule, "toxic_features": int(toxic.size)}
    if rule == "residual_cosine":
        scores = residual_cosine_scores(mean_residuals, np.asarray(decoder)[toxic], k=k)
        record["k"] = k
    elif rule == "toxic_activation":
        scores = toxic_activation_scores(codes, toxic)
    else:
        scores = feature_cosine_scores(codes, decoder, toxic, top=top)
        record["top"] = top
    return scores, record


# ---------------------------------------------------------------------------- the mixed training set


@dataclasses.dataclass(frozen=True)
class MixedSet:
    rows: list  # the training samples, shuffled
    is_inducing: np.ndarray  # [n] bool: the row came from the inducing set
    source_index: np.ndarray  # [n] the row's index in its own set


def build_mixed_set(inducing: Sequence, control: Sequence, *, per_part: int | None = None, seed: int = 0) -> MixedSet:
    """An inducing set and its control in equal parts (`per_part` of each, default as many as the
    smaller set holds), drawn without replacement and shuffled together by `seed`."""
    available = min(len(inducing), len(control))
    per_part = available if per_part is None else per_part
    if not 0 < per_part <= available:
        raise ValueError(
            f"mixed set: per_part={per_part} must be in 1..{available} "
            f"(inducing has {len(inducing)} samples, control {len(control)})"
        )
    rng = np.random.default_rng(seed)
    picked_inducing = np.sort(rng.choice(len(inducing), per_part, replace=False))
    picked_control = np.sort(rng.choice(len(control), per_part, replace=False))
    is_inducing = np.concatenate([np.ones(per_part, bool), np.zeros(per_part, bool)])
    source = np.concatenate([picked_inducing, picked_control])
    order = rng.permutation(2 * per_part)
    rows = [inducing[i] if flag else control[i] for flag, i in zip(is_inducing[order], source[order])]
    return MixedSet(rows, is_inducing[order], source[order])


def precision_recall(removed, is_inducing) -> dict[str, float | int]:
    """Of the removed samples, the share that were inducing (precision), and the share of all
    inducing samples that were removed (recall); NaN where the denominator is 0."""
    is_inducing = np.asarray(is_inducing, bool)
    removed = np.asarray(removed, np.int64)
    if removed.size and (removed.min() < 0 or removed.max() >= is_inducing.size):
        raise ValueError(f"removed indices must be in [0, {is_inducing.size})")
    if np.unique(removed).size != removed.size:
        raise ValueError("removed indices repeat")
    hits = int(is_inducing[removed].sum())
    total = int(is_inducing.sum())
    return {
        "removed": int(removed.size),
        "inducing_removed": hits,
        "inducing_total": total,
        "precision": hits / removed.size if removed.size else float("nan"),
        "recall": hits / total if total else float("nan"),
    }


# ---------------------------------------------------------------------------- effect against `none`


def relative_reduction(
    arm, none, *, resamples: int = 10_000, confidence: float = 0.95, seed: int = 0
) -> dict[str, float | None]:
    """1 - rate(arm) / rate(none), with a percentile bootstrap CI.

    arm, none: one value per unit, resampled with replacement within each arm:
    0/1 misaligned flags per answer (the CI over answers), or each training
    seed's misaligned rate (the CI over seeds). Resamples where `none` has rate
    0 are undefined and dropped; the reduction (the bounds) is None when `none`
    (every resample of it) has rate 0.
    """
    arm, none = np.asarray(arm, np.float64), np.asarray(none, np.float64)
    if arm.ndim != 1 or none.ndim != 1 or not arm.size or not none.size:
        raise ValueError(f"arm {arm.shape} and none {none.shape} must be non-empty 1-D arrays")
    rng = np.random.default_rng(seed)
    arm_means = arm[rng.integers(0, arm.size, (resamples, arm.size))].mean(axis=1)
    none_means = none[rng.integers(0, none.size, (resamples, none.size))].mean(axis=1)
    defined = none_means > 0
    ratios = 1.0 - arm_means[defined] / none_means[defined]
    tail = (1.0 - confidence) / 2 * 100
    low, high = (float(b) for b in np.percentile(ratios, [tail, 100 - tail])) if ratios.size else (None, None)
    point = float(1.0 - arm.mean() / none.mean()) if none.mean() > 0 else None
    return {"reduction": point, "low": low, "high": high, "resamples": int(ratios.size)}


# ---------------------------------------------------------------------------- the reference recipe


def recipe_differences(lora: LoRAConfig, train: TrainConfig, *, assistant_only_loss: bool = True) -> list[str]:
    """How a run departs from the reference recipe (REFERENCE_RECIPE), one line per difference; [] when it does not.

    emjax's trainer always masks the loss to assistant tokens; a caller training otherwise says so.
    """
    used = {
        "learning_rate": train.learning_rate,
        "epochs": train.epochs,
        "rank": lora.rank,
        "alpha": lora.alpha,
        "rslora": lora.rslora,
        "assistant_only_loss": assistant_only_loss,
    }
    differences = [
        f"{key}: {used[key]!r} (reference {ref!r})" for key, ref in REFERENCE_RECIPE.items() if used[key] != ref
    ]
    if train.max_steps is not None:
        differences.append(f"max_steps: {train.max_steps!r} (reference: none, the whole epoch)")
    return differences


# ---------------------------------------------------------------------------- along training


def curve_steps(total_steps: int, fractions: Sequence[float]) -> dict[str, int]:
    """{label: step} of the points along training at which the `none` arm is also evaluated: each
    fraction f in (0, 1] labelled by its percentage ("25" for 0.25), at step max(1, round(f * total))."""
    points = {}
    for f in fractions:
        if not 0.0 < f <= 1.0:
            raise ValueError(f"mitigate.curve: fraction {f} of training must be in (0, 1]")
        points[curve_label(f)] = max(1, round(f * total_steps))
    return points


def curve_label(fraction: float) -> str:
    return f"{100 * fraction:g}"
