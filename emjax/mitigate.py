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

The study's arms (the filter stage): the mix from the features stage's outputs (mix_from_features), its
held-out rows (heldout_rows) and the rows each arm keeps (choose_arms; arm_rows reads them back). Claim 3's
comparison of the arms' fine-tunes is emjax.arm_comparison.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from emjax.config import ConfigError, LoRAConfig, TrainConfig
from emjax.feature_stats import load_samples
from emjax.kernels import similarity_score, similarity_topk

SCORING_RULES = ("residual_cosine", "toxic_activation", "feature_cosine")
DEFAULT_RULE = "residual_cosine"


def _reference_recipe() -> dict:
    """Betley et al. 2025 (open_models/train.json), the recipe the emergent-misalignment literature follows: the
    config's lora and train defaults."""
    lora, train = LoRAConfig(), TrainConfig()
    return {"learning_rate": train.learning_rate, "epochs": train.epochs, "rank": lora.rank, "alpha": lora.alpha,
            "rslora": lora.rslora, "assistant_only_loss": True}  # fmt: skip


REFERENCE_RECIPE = _reference_recipe()


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


# ---------------------------------------------------------------------------- the arms (the filter stage)


def filter_arms(m) -> list[str]:
    """The arms of the `mitigate` config `m` that remove samples (each a set of kept rows): none,
    geometry-<rule>, random-<seed>, judge."""
    arms = ["none"] + [f"geometry-{rule}" for rule in m.rules] + [f"random-{s}" for s in m.random_seeds]
    return arms + (["judge"] if m.judge_filter else [])


def training_arms(m) -> list[str]:
    """The arms that keep every sample and change the training: ablation, randdir, penalty."""
    return (
        (["ablation"] if m.ablation else [])
        + (["randdir"] if m.random_directions else [])
        + (["penalty"] if m.penalty > 0 else [])
    )


def inducing_pair(cfg) -> tuple[str, str]:
    """(inducing, control) datasets of the mix: mitigate.inducing and its `pair`, else the first paired one."""
    name = cfg.mitigate.inducing
    if name is None:
        paired = sorted(n for n, d in cfg.datasets.items() if d.role == "inducing" and d.pair)
        if not paired:
            raise ConfigError("mitigate needs an inducing dataset with a `pair` (its control)")
        name = paired[0]
    if name not in cfg.datasets or not cfg.datasets[name].pair:
        raise ConfigError(f"mitigate.inducing={name!r} is not a dataset with a `pair`")
    return name, cfg.datasets[name].pair


def analysis_layer(layer: int | None, layers: Sequence[int]) -> int:
    """mitigate.layer, checked against the layers with an SAE; by default the first of them (the paper finds
    the effect strongest in earlier layers)."""
    if layer is None:
        return min(layers)
    if layer not in layers:
        raise ConfigError(f"mitigate.layer={layer} has no SAE (sae.layers: {list(layers)})")
    return layer


class MixRow(NamedTuple):
    """One sample of the mix: its dataset and index there, its mean residual and pooled sparse SAE code."""

    dataset: str
    index: int
    residual: np.ndarray
    values: np.ndarray
    indices: np.ndarray


def mix_from_features(features: Mapping[str, Path], inducing: str, control: str, layer: int, *,
                      per_part: int | None, seed: int) -> MixedSet:  # fmt: skip
    """The mix of MixRows from the features stage's outputs (`features`: dataset -> its directory) at `layer`."""
    codes = {name: load_samples(features[name], layer)[:2] for name in (inducing, control)}
    width = max(c.values.shape[1] for c, _ in codes.values())  # rows hold as many codes as their sample has
    pad = lambda x: np.pad(x, ((0, 0), (0, width - x.shape[1])))  # noqa: E731  (value 0 at id 0 adds nothing)
    parts = {}
    for name, (c, residuals) in codes.items():
        kept = np.load(features[name] / "kept.npy")
        values, indices = pad(c.values), pad(c.indices)
        parts[name] = [MixRow(name, int(i), residuals[r], values[r], indices[r]) for r, i in enumerate(kept)]
    try:
        return build_mixed_set(parts[inducing], parts[control], per_part=per_part, seed=seed)
    except ValueError as e:
        raise ConfigError(f"mitigate.per_part: {e}") from None


def heldout_rows(n: int, fraction: float, seed: int) -> np.ndarray:
    """The mix rows no arm trains on (sorted): a seeded round(fraction * n), at least one, at most n - 1."""
    if not 0.0 < fraction < 1.0:
        raise ConfigError(f"mitigate.heldout_fraction={fraction} must be in (0, 1)")
    if n < 2:
        raise ConfigError(f"the mix has {n} row(s): none left to train on once one is held out")
    count = min(n - 1, max(1, round(fraction * n)))
    return np.sort(np.random.default_rng([seed, 3]).choice(n, count, replace=False)).astype(np.int64)


def choose_arms(m, mix: MixedSet, heldout: np.ndarray, *, toxic, decoder,
                judge_scores: Callable[[list[MixRow]], np.ndarray] | None = None) -> dict[str, dict]:  # fmt: skip
    """Per filter arm of the `mitigate` config `m`, which rows of the mix it keeps and removes (indices into the
    mix; the held-out rows in neither), the precision and recall of removing inducing rows, and the scoring
    record. The held-out rows (heldout_rows) are scored by every arm's fine-tune (its task loss), so the arms'
    losses compare on one set of rows; the arms choose from the rest (the pool):
    - none: every row;
    - geometry-<rule>: remove m.fraction of the pool, the rows scoring highest against the `toxic` features
      (SAE `decoder`) by each of m.rules (score_samples);
    - random-<seed>: remove as many rows at random;
    - judge: remove the rows `judge_scores` rates most harmful (as many).
    The training arms (training_arms: ablation, randdir, penalty) keep every row of the pool."""
    pool = np.setdiff1d(np.arange(len(mix.rows)), heldout)
    rows, is_inducing = [mix.rows[i] for i in pool], np.asarray(mix.is_inducing)[pool]
    n = len(rows)
    residuals = np.stack([r.residual for r in rows])
    codes = (np.stack([r.values for r in rows]), np.stack([r.indices for r in rows]))
    removed, records = {"none": np.zeros(0, np.int64)}, {"none": {"rule": "keep everything"}}
    for rule in m.rules:
        scores, record = score_samples(rule, toxic_features=toxic, decoder=decoder, mean_residuals=residuals,
                                       codes=codes)  # fmt: skip
        removed[f"geometry-{rule}"], records[f"geometry-{rule}"] = select_removal(scores, m.fraction), record
    for seed in m.random_seeds:
        removed[f"random-{seed}"] = random_removal(n, m.fraction, seed=seed)
        records[f"random-{seed}"] = {"rule": "random", "seed": seed}
    if m.judge_filter:
        scores = judge_scores(rows)
        removed["judge"] = select_removal(scores, m.fraction)
        records["judge"] = {"rule": "judge harm score", "unscored": int(np.isinf(scores).sum())}
    arms = {}
    for arm, gone in removed.items():  # indices into the pool, written as indices into the mix
        keep = np.setdiff1d(np.arange(n), gone)
        arms[arm] = {"kept": pool[keep].tolist(), "removed": pool[gone].tolist(),
                     "selection": precision_recall(gone, is_inducing), "record": records[arm]}  # fmt: skip
    return arms


def mix_records(mix: MixedSet, heldout: np.ndarray) -> list[dict]:
    """mix.json: each row's dataset and index, whether it is inducing and whether it is held out."""
    held = set(heldout.tolist())
    return [{"dataset": r.dataset, "index": r.index, "inducing": bool(f), "heldout": i in held}
            for i, (r, f) in enumerate(zip(mix.rows, mix.is_inducing))]  # fmt: skip


def arm_rows(mix: Sequence[dict], arms: Mapping[str, dict], arm: str | None) -> list[tuple[str, int]]:
    """(dataset, index) of the rows an arm trains on, from mix.json and arms.json; arm None: the held-out rows
    every arm's fine-tune is scored on. A training arm (not in arms.json) keeps every row not held out."""
    if arm is None:
        chosen = [i for i, r in enumerate(mix) if r["heldout"]]
    else:
        chosen = arms.get(arm, {}).get("kept")
        if chosen is None:
            chosen = [i for i, r in enumerate(mix) if not r["heldout"]]
    return [(mix[i]["dataset"], mix[i]["index"]) for i in chosen]


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
