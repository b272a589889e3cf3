"""Feature geometry: how close feature sets lie to a toxic set, with null baselines and significance.

Directions are the rows of an SAE's decoder W_dec [d_sae, d_model] (or its
encoder W_enc.T), unit-normalised; cosines come from the fused similarity
kernel (emjax.kernels.similarity_topk), so no d_sae x d_sae matrix is stored.
Zero-norm (dead) rows have no direction: they are masked and counted, never
NaN. A feature is never compared with itself.

    prox = proximity(W_dec, inducing, toxic, k=1)          # per feature, its max cosine to a toxic feature
    test = permutation_test(W_dec, inducing, control, toxic)  # effect, one-sided p-value
    values, ids = neighbours(W_dec, k=10)                    # each feature's nearest features

Command line: python -m emjax.geometry neighbours SAE_A [SAE_B] --k=10 [--out=FILE.safetensors]
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import sys
from collections.abc import Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec
from scipy import special

from emjax import artifacts, features, stats
from emjax.feature_stats import SampleCodes, sample_codes
from emjax.kernels import similarity_topk
from emjax.plots import markdown_table

AGGREGATIONS = ("mean_of_max", "mean_pairwise", "max")


def unit_rows(matrix) -> tuple[np.ndarray, np.ndarray]:
    """(rows / |row| in float32, alive [n] bool); dead (zero-norm) rows stay zero."""
    m = np.asarray(matrix, np.float64)
    if m.ndim != 2:
        raise ValueError(f"directions must be a 2-D [d_sae, d_model] matrix, got shape {m.shape}")
    if not np.isfinite(m).all():
        bad = np.argwhere(~np.isfinite(m))[0]
        raise ValueError(f"directions: non-finite value at row {bad[0]}, column {bad[1]}")
    norm = np.linalg.norm(m, axis=1)
    alive = norm > 0
    unit = np.divide(m, norm[:, None], out=np.zeros_like(m), where=alive[:, None])
    return unit.astype(np.float32), alive


def set_direction(rows, ids: Sequence[int]) -> np.ndarray:
    """The unit mean of the unit rows `ids` of `rows` [n, d] (float64): a feature set's direction."""
    ids = np.asarray(ids, np.int64)
    if not len(ids):
        raise ValueError("an empty feature set has no direction")
    return _unit(_unit(np.asarray(rows)[ids]).mean(0))


def cosines_to(rows, direction: np.ndarray) -> np.ndarray:
    """[n] float64: the cosine of each of `rows` [n, d] to the unit `direction` [d] (a zero row's is 0)."""
    return _unit(rows) @ direction


def _unit(w) -> np.ndarray:
    w = np.asarray(w, np.float64)
    return w / np.maximum(np.linalg.norm(w, axis=-1, keepdims=True), 1e-30)


def sae_directions(sae, which: str = "decoder") -> np.ndarray:
    """[d_sae, d_in] feature directions of an emjax SAE: decoder rows, or encoder columns (`encoder`)."""
    from emjax.distributed import gather_to_host

    if which == "decoder":
        return gather_to_host(sae.W_dec[...])
    if which == "encoder":
        return gather_to_host(sae.W_enc[...]).T
    raise ValueError(f"which must be 'decoder' or 'encoder', got {which!r}")


def _ids(features, d_sae: int, what: str) -> np.ndarray:
    ids = np.asarray(features, np.int64).reshape(-1)
    if ids.size and (ids.min() < 0 or ids.max() >= d_sae):
        raise ValueError(f"{what}: feature ids must be in 0..{d_sae - 1}, got {ids.min()}..{ids.max()}")
    return ids


@dataclasses.dataclass
class Proximity:
    """Per-feature closeness of `features` to a toxic set (entries of dead features are 0 and masked)."""

    features: np.ndarray  # [n] feature ids
    alive: np.ndarray  # [n] bool
    top_k_mean: np.ndarray  # [n] mean of the k highest cosines to toxic features (not itself)
    max: np.ndarray  # [n] the highest of them
    pair_sum: np.ndarray  # [n] sum of cosines to every live toxic feature (not itself)
    pair_count: np.ndarray  # [n] how many toxic features that sum covers
    is_toxic: np.ndarray  # [n] bool: the feature is itself in the toxic set
    dead_toxic: int  # toxic features with a zero-norm direction (left out)

    def aggregate(self, how: str = "mean_of_max") -> float:
        """mean_of_max: mean of the per-feature top-k means (k=1: maxima); mean_pairwise: mean cosine
        over all (feature, toxic) pairs; max: the highest cosine of any feature."""
        if not self.alive.any():
            raise ValueError("no live feature in the set: every direction has zero norm")
        if how == "mean_of_max":
            return float(self.top_k_mean[self.alive].mean())
        if how == "mean_pairwise":
            return float(self.pair_sum[self.alive].sum() / self.pair_count[self.alive].sum())
        if how == "max":
            return float(self.max[self.alive].max())
        raise ValueError(f"unknown aggregation {how!r}; choose one of {AGGREGATIONS}")

    def summary(self) -> dict:
        out = {how: self.aggregate(how) for how in AGGREGATIONS} if self.alive.any() else {}
        return out | {
            "features": int(len(self.features)),
            "dead_features": int((~self.alive).sum()),
            "dead_toxic": self.dead_toxic,
            "toxic_features_in_set": [int(f) for f in self.features[self.is_toxic]],
        }


def feature_proximity(directions, features, toxic, *, k: int = 1, mesh: Mesh | None = None, unit=None) -> Proximity:
    """Closeness of each of `features` to the `toxic` set (see Proximity); `unit` = unit_rows(directions)."""
    unit, alive = unit_rows(directions) if unit is None else unit
    d_sae = len(unit)
    features = _ids(features, d_sae, "features")
    toxic = np.unique(_ids(toxic, d_sae, "toxic"))
    keys = toxic[alive[toxic]]
    m = len(keys)
    if not isinstance(k, int) or k < 1:
        raise ValueError(f"k must be a positive integer, got {k!r}")
    is_toxic = np.isin(features, keys)
    live = alive[features]
    if k > m - int((is_toxic & live).any()):
        raise ValueError(f"k={k} exceeds the {m} live toxic features (less the feature itself, when it is toxic)")
    n = len(features)
    top_k_mean, best = np.zeros(n), np.zeros(n)
    queries = features[live]
    if len(queries):
        kk = min(k + 1, m) if (is_toxic & live).any() else k
        # Queries padded to a power of two: a few compiled shapes serve every set size (zero rows sliced off).
        padded = np.zeros((max(8, 1 << (len(queries) - 1).bit_length()), unit.shape[1]), unit.dtype)
        padded[: len(queries)] = unit[queries]
        # A one-device mesh adds nothing but a shard_map traced (and compiled) again on every call.
        mesh = mesh if mesh is not None and mesh.size > 1 else None
        values, found = similarity_topk(padded, unit[keys], kk, normalize=False, mesh=mesh)
        values = np.asarray(values, np.float64)[: len(queries)]
        found = keys[np.asarray(found)[: len(queries)]]
        # Push the feature's own entry to the end, then keep the first k (still in descending order).
        order = np.argsort(found == queries[:, None], axis=1, kind="stable")[:, :k]
        values = np.take_along_axis(values, order, axis=1)
        top_k_mean[live], best[live] = values.mean(1), values[:, 0]
    total = unit[keys].astype(np.float64).sum(0)
    u = unit[features].astype(np.float64)
    pair_sum = u @ total - np.where(is_toxic, (u * u).sum(1), 0.0)
    pair_count = np.where(live, m - is_toxic, 0)
    return Proximity(features, live, top_k_mean, best, pair_sum, pair_count, is_toxic, int(len(toxic) - m))


def proximity(decoder, sources, toxic, *, k: int = 1, mesh: Mesh | None = None) -> np.ndarray:
    """For each feature in `sources`, the mean of its k highest cosines to the features in `toxic`
    (decoder [d_sae, d_model] rows), never counting a feature against itself.

    Returns a numpy masked array (an ndarray): dead (zero-norm) source rows are masked, data 0.
    """
    p = feature_proximity(decoder, sources, toxic, k=k, mesh=mesh)
    return np.ma.MaskedArray(p.top_k_mean, mask=~p.alive)


# ---------------------------------------------------------------------------- significance


def frequency_matched_null(
    decoder,
    sources,
    toxic,
    density,
    *,
    k: int = 1,
    how: str = "mean_of_max",
    draws: int = 1000,
    bins: int = 10,
    seed: int = 0,
    mesh: Mesh | None = None,
) -> dict:
    """The aggregate proximity of random feature sets matched to `sources` on firing density.

    Live features outside the toxic set are ranked by (density, id) and cut into `bins`
    equal-count bins (deciles); each draw takes, without replacement, as many features
    from each bin as `sources` has there. Returns the draws, their mean, 95% interval, the
    observed value, the one-sided p-value of observed >= null (observed counted) and the
    two-sided one (distance from the null's mean).
    """
    if how not in AGGREGATIONS:
        raise ValueError(f"unknown aggregation {how!r}; choose one of {AGGREGATIONS}")
    unit = unit_rows(decoder)
    alive = unit[1]
    d_sae = len(alive)
    density = np.asarray(density, np.float64)
    if density.shape != (d_sae,):
        raise ValueError(f"density has shape {density.shape}, expected ({d_sae},)")
    sources = _ids(sources, d_sae, "sources")
    toxic_ids = np.unique(_ids(toxic, d_sae, "toxic"))
    observed = feature_proximity(decoder, sources, toxic_ids, k=k, mesh=mesh, unit=unit).aggregate(how)
    pool = np.setdiff1d(np.flatnonzero(alive), toxic_ids)
    ranked = pool[np.lexsort((pool, density[pool]))]
    edges = np.linspace(0, len(ranked), bins + 1).round().astype(int)
    # Each live source's rank among the pool by density (a toxic source: where its density would fall).
    live_sources = sources[alive[sources]]
    rank = np.empty(d_sae, np.int64)
    rank[ranked] = np.arange(len(ranked))
    in_pool = np.isin(live_sources, ranked)
    position = np.where(in_pool, rank[live_sources], np.searchsorted(density[ranked], density[live_sources]))
    source_bins = np.clip(np.searchsorted(edges, position, side="right") - 1, 0, bins - 1)
    wanted = np.bincount(source_bins, minlength=bins)
    for b in range(bins):
        if wanted[b] > edges[b + 1] - edges[b]:
            raise ValueError(f"density bin {b} has {edges[b + 1] - edges[b]} features, {wanted[b]} needed")
    per = feature_proximity(decoder, ranked, toxic_ids, k=k, mesh=mesh, unit=unit)
    value = {
        "mean_of_max": per.top_k_mean,
        "max": per.max,
        "mean_pairwise": per.pair_sum / np.maximum(per.pair_count, 1),
    }
    rng = np.random.default_rng(seed)
    null = np.empty(draws)
    for i in range(draws):
        chosen = np.concatenate(
            [edges[b] + rng.choice(edges[b + 1] - edges[b], wanted[b], replace=False) for b in range(bins) if wanted[b]]
        )
        v = value[how][chosen]
        null[i] = v.max() if how == "max" else v.mean()
    return {
        "how": how,
        "observed": observed,
        "null_mean": float(null.mean()),
        "null_std": float(null.std()),
        "null_ci95": [float(np.percentile(null, 2.5)), float(np.percentile(null, 97.5))],
        "p_value": float((1 + np.sum(null >= observed - stats.tolerance(observed))) / (1 + draws)),
        # Two-sided around the null's own mean: a random set's proximity is a level, not a difference.
        "p_two_sided": stats.permutation_p(null, observed, center=float(null.mean()))["p_two_sided"],
        "draws": null,
    }


def permutation_test(
    decoder, a, b, toxic, *, k: int = 1, permutations: int = 10000, seed: int = 0, mesh: Mesh | None = None
) -> dict:
    """Test that set `a` lies closer to `toxic` than set `b`, CONDITIONAL ON THE SELECTION of both sets:
    the pooled features are relabelled at random (set sizes kept), so selection noise is ignored and
    correlated features count as independent (selection_permutation_test is the test of the claim).

    effect = mean proximity of a - mean proximity of b (per-feature top-k mean cosine, dead features
    left out); p_value = p_greater = (1 + #{permuted effect >= observed}) / (1 + permutations);
    p_two_sided counts |permuted| >= |observed|. `aggregations` holds the same for each of AGGREGATIONS.
    """
    unit = unit_rows(decoder)
    pa = feature_proximity(decoder, a, toxic, k=k, mesh=mesh, unit=unit)
    pb = feature_proximity(decoder, b, toxic, k=k, mesh=mesh, unit=unit)
    if not pa.alive.any() or not pb.alive.any():
        raise ValueError(
            f"permutation_test: both sets need live features, got {int(pa.alive.sum())} and {int(pb.alive.sum())}"
        )
    per = {
        name: np.concatenate([getattr(pa, name)[pa.alive], getattr(pb, name)[pb.alive]])
        for name in ("top_k_mean", "max", "pair_sum", "pair_count")
    }
    na, n = int(pa.alive.sum()), int(pa.alive.sum() + pb.alive.sum())
    in_a = np.zeros((1, n), bool)
    in_a[0, :na] = True
    observed = _relabel_effects(per, in_a)
    rng = np.random.default_rng(seed)
    null = {how: [] for how in AGGREGATIONS}
    done = 0
    while done < permutations:
        block = min(permutations - done, max(1, (1 << 22) // n))
        labels = rng.permuted(np.broadcast_to(in_a[0], (block, n)), axis=1)
        for how, values in _relabel_effects(per, labels).items():
            null[how].append(values)
        done += block
    aggregations = {
        how: {"effect": float(observed[how][0])} | stats.permutation_p(np.concatenate(null[how]), observed[how][0])
        for how in AGGREGATIONS
    }
    main = aggregations["mean_of_max"]
    return {
        "effect": main["effect"],
        "p_value": main["p_greater"],
        "p_greater": main["p_greater"],
        "p_two_sided": main["p_two_sided"],
        "mean_a": float(pa.top_k_mean[pa.alive].mean()),
        "mean_b": float(pb.top_k_mean[pb.alive].mean()),
        "n_a": na,
        "n_b": n - na,
        "dead_a": int((~pa.alive).sum()),
        "dead_b": int((~pb.alive).sum()),
        "permutations": permutations,
        "aggregations": aggregations,
    }


def _relabel_effects(per: dict, in_a: np.ndarray) -> dict:
    """Each aggregation's a-minus-b difference for each row of the boolean labels in_a [r, n]."""
    w_a, w_b = in_a.astype(np.float64), (~in_a).astype(np.float64)
    mean = lambda v, w: (w @ v) / w.sum(1)  # noqa: E731
    maxed = lambda v, m: np.where(m, v, -np.inf).max(1)  # noqa: E731
    return {
        "mean_of_max": mean(per["top_k_mean"], w_a) - mean(per["top_k_mean"], w_b),
        "mean_pairwise": (w_a @ per["pair_sum"]) / (w_a @ per["pair_count"])
        - (w_b @ per["pair_sum"]) / (w_b @ per["pair_count"]),
        "max": maxed(per["max"], in_a) - maxed(per["max"], ~in_a),
    }


# ---------------------------------------------------------------------------- the selection permutation test
# Claim 1's test: the sample labels are permuted and the features re-selected each time, so the null
# carries the selection's noise and the features' correlations. Only the per-feature sum over the
# positive samples changes under a permutation (the pooled sums and spread are fixed), so each
# permutation's label correlation is one matrix product, batched over permutations on the device
# and blocked over features (each block's top features merged on the host, as a sharded top-k).

SELECTION_BATCH = 128  # permutations per device step (results do not depend on it)
_BLOCK_BYTES = 1 << 29  # dense [samples, features] float32 block per step


def _take_rows(codes, rows: np.ndarray):
    if isinstance(codes, SampleCodes):
        return SampleCodes(codes.values[rows], codes.indices[rows], codes.d_sae)
    return codes[rows]


def _columns(codes, lo: int, hi: int) -> np.ndarray:
    """[N, hi - lo] float32: columns lo..hi-1 of the codes, dense (duplicate sparse entries summed)."""
    if not isinstance(codes, SampleCodes):
        return np.asarray(codes[:, lo:hi], np.float32)
    out = np.zeros((len(codes), hi - lo), np.float32)
    inside = (codes.indices >= lo) & (codes.indices < hi) & (codes.values != 0)
    rows = np.broadcast_to(np.arange(len(codes))[:, None], codes.indices.shape)[inside]
    np.add.at(out, (rows, codes.indices[inside] - lo), codes.values[inside])
    return out


def sample_density(*codes) -> np.ndarray:
    """Per feature, the share of samples (over every given set) whose pooled code is non-zero."""
    d = features._d_sae(codes[0])
    fired = np.zeros(d)
    for c in codes:
        if isinstance(c, SampleCodes):
            for row_values, row_ids in zip(c.values, c.indices):
                fired[np.unique(row_ids[row_values != 0])] += 1
        else:
            fired += (np.asarray(c) != 0).sum(0)
    return fired / max(sum(len(c) for c in codes), 1)


@dataclasses.dataclass
class _Group:
    """Samples whose labels are permuted together (all of them, or one half when cross-fitting)."""

    codes: object  # SampleCodes or [N, d] array: positive rows first
    n_pos: int
    slope: np.ndarray  # [d] correlation = slope * (sum over positive rows) + offset
    offset: np.ndarray  # [d]

    @classmethod
    def make(cls, pos, neg, eligible: np.ndarray) -> _Group:
        n1, n0 = len(pos), len(neg)
        if not n1 or not n0:
            raise ValueError(f"selection test: both sides need samples in every group, got {n1} and {n0}")
        (s1, q1), (s0, q0) = features._sums(pos), features._sums(neg)
        n = n1 + n0
        std = np.sqrt(features._variance((q1 + q0) / n, (s1 + s0) / n))
        scale = np.divide(np.sqrt(n1 * n0) / n, std, out=np.zeros_like(std), where=(std > 0) & eligible)
        # r = (s1/n1 - (S - s1)/n0) * scale: the point-biserial correlation of features.label_correlation.
        return cls(_concat_rows(pos, neg), n1, scale * (1 / n1 + 1 / n0), -scale * (s1 + s0) / n0)


def _concat_rows(a, b):
    """Rows of a then b (sparse when either is; narrower sparse rows padded with zero values)."""
    if not isinstance(a, SampleCodes) and not isinstance(b, SampleCodes):
        return np.concatenate([np.asarray(a), np.asarray(b)])
    a, b = (c if isinstance(c, SampleCodes) else features._to_sparse(np.asarray(c)) for c in (a, b))
    width = max(a.values.shape[1], b.values.shape[1])
    pad = lambda x: np.pad(x, ((0, 0), (0, width - x.shape[1])))  # noqa: E731
    return SampleCodes(
        np.concatenate([pad(a.values), pad(b.values)]), np.concatenate([pad(a.indices), pad(b.indices)]), a.d_sae
    )


@functools.partial(jax.jit, static_argnames=("kk",))
def _block_top(labels, x, slope, offset, other_labels, other_x, other_slope, other_offset, *, kk: int):
    """One feature block: each permutation's kk highest and lowest correlations (values, block ids) and
    the other group's correlation at those ids (cross-fitting; zeros when there is no other group)."""
    hi = jax.lax.Precision.HIGHEST  # never TF32: the selection compares correlations
    r = slope * jnp.matmul(labels, x, precision=hi) + offset
    r_other = other_slope * jnp.matmul(other_labels, other_x, precision=hi) + other_offset
    top_v, top_i = jax.lax.top_k(r, kk)  # ties: the lower id first, as features.top_features
    low_v, low_i = jax.lax.top_k(-r, kk)
    take = lambda ids: jnp.take_along_axis(r_other, ids, axis=1)  # noqa: E731
    return top_v, top_i, -low_v, low_i, take(top_i), take(low_i)


def _merge_top(values: np.ndarray, ids: np.ndarray, other: np.ndarray, n: int, descending: bool):
    """The n best candidates per row over the blocks' (values, ids): by value, ties to the lower id."""
    key = -values if descending else values
    order = np.lexsort((ids, key), axis=1)[:, :n]
    pick = lambda a: np.take_along_axis(a, order, axis=1)  # noqa: E731
    return pick(values), pick(ids), pick(other)


def _permuted_selections(groups, other_of, labels_of, top_n: int, mesh: Mesh | None):
    """For each group and each row of its labels [r, N_g]: (inducing ids, control ids) [r, top_n] (-1: none
    selected there) and the other group's correlation at those ids (cross-fitting)."""
    d = features._d_sae(groups[0].codes)
    out = []
    for g, group in enumerate(groups):
        labels = labels_of[g]
        other = groups[other_of[g]] if other_of[g] is not None else None
        rows = len(labels)
        n_samples = len(group.codes) + (len(other.codes) if other is not None else 0)
        block = max(1, min(d, _BLOCK_BYTES // (4 * n_samples)))
        kk = min(top_n, block)
        cands = {key: [] for key in ("top_v", "top_i", "low_v", "low_i", "top_o", "low_o")}
        for lo in range(0, d, block):
            hi = min(d, lo + block)
            x = jnp.asarray(_columns(group.codes, lo, hi))
            s, o = (jnp.asarray(a[lo:hi], jnp.float32) for a in (group.slope, group.offset))
            if other is not None:
                ox = jnp.asarray(_columns(other.codes, lo, hi))
                os_, oo = (jnp.asarray(a[lo:hi], jnp.float32) for a in (other.slope, other.offset))
            else:
                ox, os_, oo = jnp.zeros((1, hi - lo)), jnp.zeros(hi - lo), jnp.zeros(hi - lo)
            parts = {key: [] for key in cands}
            for start in range(0, rows, SELECTION_BATCH):
                lab = labels[start : start + SELECTION_BATCH]
                real = len(lab)
                lab = np.concatenate([lab, np.repeat(lab[:1], SELECTION_BATCH - real, 0)])  # one compiled shape
                olab = labels_of[other_of[g]][start : start + SELECTION_BATCH] if other is not None else None
                olab = (np.concatenate([olab, np.repeat(olab[:1], SELECTION_BATCH - real, 0)]) if other is not None
                        else np.zeros((SELECTION_BATCH, 1)))  # fmt: skip
                lab, olab = (_placed(a.astype(np.float32), mesh) for a in (lab, olab))
                result = _block_top(lab, x, s, o, olab, ox, os_, oo, kk=kk)
                for key, value in zip(parts, result):
                    parts[key].append(np.asarray(value)[:real])
            for key in cands:
                value = np.concatenate(parts[key])
                cands[key].append(value + lo if key.endswith("_i") else value)
        cat = {key: np.concatenate(v, axis=1) for key, v in cands.items()}
        top_v, top_i, top_o = _merge_top(cat["top_v"], cat["top_i"], cat["top_o"], top_n, True)
        low_v, low_i, low_o = _merge_top(cat["low_v"], cat["low_i"], cat["low_o"], top_n, False)
        # features.top_features keeps positive scores for the inducing side and negative ones for the control.
        out.append((np.where(top_v > 0, top_i, -1), np.where(low_v < 0, low_i, -1), top_o, low_o))
    return out


def _placed(a: np.ndarray, mesh: Mesh | None):
    """Permutations split over every device of a (single-process) mesh, else on the default device."""
    if mesh is None or mesh.size == 1 or len(a) % mesh.size:
        return jnp.asarray(a)
    return jax.device_put(a, NamedSharding(mesh, PartitionSpec(mesh.axis_names)))


def _exact_selection(group: _Group, eligible: np.ndarray, top_n: int):
    """The observed selection in float64 exactly as the geometry stage makes it (label_correlation, top_features)."""
    n = group.n_pos
    pos, neg = _take_rows(group.codes, np.arange(n)), _take_rows(group.codes, np.arange(n, len(group.codes)))
    scores = np.where(eligible, features.label_correlation(pos, neg), 0.0)
    chosen = features.top_features(scores, top_n)
    pad = lambda ids: np.concatenate([ids, -np.ones(top_n - len(ids), np.int64)])[None]  # noqa: E731
    return pad(chosen["positive"]), pad(chosen["negative"]), scores


def _set_values(per: dict, ids: np.ndarray) -> dict:
    """Each aggregation of the per-feature proximities over the sets ids [r, n] (-1 and dead left out): [r]."""
    valid = (ids >= 0) & per["alive"][np.maximum(ids, 0)]
    take = lambda name: np.where(valid, per[name][np.maximum(ids, 0)], 0.0)  # noqa: E731
    count = valid.sum(1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return {
            "mean_of_max": np.where(count > 0, take("top_k_mean").sum(1) / count, np.nan),
            "mean_pairwise": np.where(count > 0, take("pair_sum").sum(1) / take("pair_count").sum(1), np.nan),
            "max": np.where(count > 0, np.where(valid, per["max"][np.maximum(ids, 0)], -np.inf).max(1), np.nan),
        }


def _differences(per: dict, inducing: list, control: list) -> dict:
    """Aggregation -> [r] inducing minus control, averaged over the (fold) sets given; NaN where undefined."""
    folds = [
        {how: a[how] - b[how] for how in AGGREGATIONS}
        for a, b in ((_set_values(per, i), _set_values(per, c)) for i, c in zip(inducing, control))
    ]
    return {how: np.mean([f[how] for f in folds], axis=0) for how in AGGREGATIONS}


def _overlap_share(is_toxic: np.ndarray, ids: np.ndarray) -> np.ndarray:
    valid = ids >= 0
    with np.errstate(invalid="ignore", divide="ignore"):
        return (valid & is_toxic[np.maximum(ids, 0)]).sum(1) / valid.sum(1)


def selection_tests(
    pos, neg, directions: Mapping[str, np.ndarray], toxic, *, top_n: int, k: int = 1, permutations: int = 1000,
    seed: int = 0, max_density: float | None = None, density=None, halves=None, mesh: Mesh | None = None,
) -> dict:  # fmt: skip
    """The selection permutation test for several direction sets at once (one selection per permutation).

    halves=None: select on every sample; halves=(pos_half [N1], neg_half [N2]) of 0/1: cross-fitting,
    each half selects (top_n inducing and control features) and the other half keeps the features whose
    label correlation there has the same sign; the effect is the mean over the two folds; labels are
    permuted within each half. Returns {"directions": {name: result}, "overlap": ..., "selected": ...}
    (see selection_permutation_test for a result's keys).
    """
    pos, neg = sample_codes(pos, "pos"), sample_codes(neg, "neg")
    d = features._d_sae(pos)
    if features._d_sae(neg) != d:
        raise ValueError(f"selection test: pos has {d} features, neg has {features._d_sae(neg)}")
    if not isinstance(top_n, int) or top_n < 1:
        raise ValueError(f"top_n must be a positive integer, got {top_n!r}")
    eligible = np.ones(d, bool)
    if max_density is not None:
        density = sample_density(pos, neg) if density is None else np.asarray(density, np.float64)
        if density.shape != (d,):
            raise ValueError(f"density has shape {density.shape}, expected ({d},)")
        eligible = density <= max_density
    toxic_ids = np.unique(_ids(toxic, d, "toxic"))
    per_direction = {}
    for name, m in directions.items():
        m = np.asarray(m)
        if m.shape[0] != d:
            raise ValueError(f"{name}: {m.shape[0]} directions for {d} features")
        p = feature_proximity(m, np.arange(d), toxic_ids, k=k, mesh=mesh)
        per_direction[name] = {"top_k_mean": p.top_k_mean, "max": p.max, "pair_sum": p.pair_sum,
                               "pair_count": p.pair_count.astype(np.float64), "alive": p.alive}  # fmt: skip
    is_toxic = np.zeros(d, bool)
    is_toxic[toxic_ids] = True

    # Groups of samples whose labels are permuted together, and which group tests which one's selection.
    if halves is None:
        groups, other_of = [_Group.make(pos, neg, eligible)], [None]
    else:
        pos_half, neg_half = (np.asarray(h).astype(np.int64).ravel() for h in halves)
        if pos_half.shape != (len(pos),) or neg_half.shape != (len(neg),) or not np.isin(
            np.concatenate([pos_half, neg_half]), (0, 1)
        ).all():
            raise ValueError(f"halves must be two 0/1 vectors of lengths {len(pos)} and {len(neg)}")
        groups = [
            _Group.make(_take_rows(pos, np.flatnonzero(pos_half == h)), _take_rows(neg, np.flatnonzero(neg_half == h)),
                        eligible)
            for h in (0, 1)
        ]  # fmt: skip
        other_of = [1, 0]

    # Observed: exact float64 selection; the other half's correlation for cross-fitting.
    observed = []
    exact = [_exact_selection(g, eligible, top_n) for g in groups]
    for g, (ind, ctl, _) in enumerate(exact):
        if other_of[g] is None:
            observed.append((ind, ctl))
        else:
            other_scores = exact[other_of[g]][2]
            observed.append(_replicated(ind, ctl, other_scores[np.maximum(ind, 0)], other_scores[np.maximum(ctl, 0)]))

    rng = np.random.default_rng(seed)
    labels_of = []
    for g in groups:
        base = np.arange(len(g.codes)) < g.n_pos
        labels_of.append(rng.permuted(np.broadcast_to(base, (permutations, len(base))), axis=1))
    null_sel = _permuted_selections(groups, other_of, labels_of, top_n, mesh)
    null = []
    for g, (ind, ctl, ind_other, ctl_other) in enumerate(null_sel):
        null.append((ind, ctl) if other_of[g] is None else _replicated(ind, ctl, ind_other, ctl_other))

    results = {}
    for name, per in per_direction.items():
        entry = {}
        for label, drop_shared in (("with_shared", False), ("without_shared", True)):
            strip = (lambda ids: np.where(is_toxic[np.maximum(ids, 0)], -1, ids)) if drop_shared else (lambda ids: ids)
            obs = _differences(per, [strip(i) for i, _ in observed], [strip(c) for _, c in observed])
            nul = _differences(per, [strip(i) for i, _ in null], [strip(c) for _, c in null])
            entry[label] = {
                how: {"effect": stats.finite_or_none(obs[how][0])} | stats.permutation_p(nul[how], obs[how][0])
                for how in AGGREGATIONS
            }
        ind_values = [_set_values(per, i) for i, _ in observed]
        ctl_values = [_set_values(per, c) for _, c in observed]
        entry["mean_inducing"] = stats.finite_or_none(np.mean([v["mean_of_max"][0] for v in ind_values]))
        entry["mean_control"] = stats.finite_or_none(np.mean([v["mean_of_max"][0] for v in ctl_values]))
        entry["live_inducing"] = int(sum(((i >= 0) & per["alive"][np.maximum(i, 0)]).sum() for i, _ in observed))
        entry["live_control"] = int(sum(((c >= 0) & per["alive"][np.maximum(c, 0)]).sum() for _, c in observed))
        results[name] = entry

    def share(selections):
        return np.mean([_overlap_share(is_toxic, i) - _overlap_share(is_toxic, c) for i, c in selections], 0)

    overlap_obs = share(observed)[0]
    n_ind = [int((i >= 0).sum()) for i, _ in observed]
    n_ctl = [int((c >= 0).sum()) for _, c in observed]
    k_ind = [int(((i >= 0) & is_toxic[np.maximum(i, 0)]).sum()) for i, _ in observed]
    k_ctl = [int(((c >= 0) & is_toxic[np.maximum(c, 0)]).sum()) for _, c in observed]
    population, marked = int(eligible.sum()), int((is_toxic & eligible).sum())
    overlap = {
        "inducing": sum(k_ind), "control": sum(k_ctl), "inducing_size": sum(n_ind), "control_size": sum(n_ctl),
        "share_difference": stats.finite_or_none(overlap_obs),
        "permutation": stats.permutation_p(share(null), overlap_obs),
    }  # fmt: skip
    if halves is None and population and marked <= population:
        overlap["hypergeometric"] = {
            side: stats.overlap_test(k, n, marked, population)
            for side, k, n in (("inducing", k_ind[0], n_ind[0]), ("control", k_ctl[0], n_ctl[0]))
        }
        overlap["fisher"] = stats.fisher_2x2(k_ind[0], n_ind[0], k_ctl[0], n_ctl[0])
        overlap["population"], overlap["toxic_in_population"] = population, marked
    return {
        "directions": results,
        "overlap": overlap,
        "selected": [{"inducing": [int(j) for j in i[0] if j >= 0], "control": [int(j) for j in c[0] if j >= 0]}
                     for i, c in observed],  # fmt: skip
        "top_n": top_n,
        "k": k,
        "permutations": permutations,
        "excluded_dense": int((~eligible).sum()),
        "split": "half" if halves is not None else None,
    }


def _replicated(ind, ctl, ind_other, ctl_other):
    """Cross-fitting: the selected features whose correlation on the other half has the same sign."""
    return np.where((ind >= 0) & (ind_other > 0), ind, -1), np.where((ctl >= 0) & (ctl_other < 0), ctl, -1)


def selection_permutation_test(
    pos, neg, decoder, toxic, *, top_n, k=1, permutations=1000, seed=0, max_density=None, density=None, mesh=None
) -> dict:
    """Claim 1's test: are the features selected as inducing closer to the toxic features than those
    selected as control, beyond what selecting from these samples gives by chance?

    pos [N1, d_sae], neg [N2, d_sae]: per-sample codes of the inducing and the control samples (arrays or
    SampleCodes). Each permutation shuffles the sample labels (sizes kept), selects the inducing
    (positive) and control (negative) features by features.label_correlation and features.top_features
    (top_n each, features with density above max_density excluded; density defaults to the share of
    samples whose pooled code is non-zero) and computes effect = mean proximity of the inducing features
    to the `toxic` rows of `decoder` minus that of the control features (feature_proximity's top-k mean
    cosine, a feature's match with itself not counted, dead features left out).

    Returns effect, p_greater = (1 + #{null >= effect}) / (1 + permutations), p_two_sided = (1 +
    #{|null| >= |effect|}) / (1 + permutations), null_mean, null_sd, permutations (permutations whose
    selection left a side without a live feature are undefined, left out and counted), and
    `aggregations` (every aggregation), `without_shared` (the sets less the features that are themselves
    toxic), `overlap` (how many selected features are toxic: hypergeometric and Fisher tests, and the
    permutation of the difference in shares), `selected` and the sizes.
    """
    out = selection_tests(pos, neg, {"decoder": decoder}, toxic, top_n=top_n, k=k, permutations=permutations,
                          seed=seed, max_density=max_density, density=density, mesh=mesh)  # fmt: skip
    d = out["directions"]["decoder"]
    main = d["with_shared"]["mean_of_max"]
    return {
        **main,
        "aggregations": d["with_shared"],
        "without_shared": d["without_shared"],
        "mean_inducing": d["mean_inducing"],
        "mean_control": d["mean_control"],
        "n_inducing": d["live_inducing"],
        "n_control": d["live_control"],
        "overlap": out["overlap"],
        "selected": out["selected"][0],
        "top_n": top_n,
        "k": k,
        "excluded_dense": out["excluded_dense"],
    }


def selection_bootstrap(
    pos, neg, directions: Mapping[str, np.ndarray], toxic, *, top_n: int, k: int = 1, resamples: int = 200,
    seed: int = 0, max_density: float | None = None, density=None, level: float = 0.95,
) -> dict:  # fmt: skip
    """Percentile intervals of the selection effect (inducing minus control proximity, each aggregation and
    direction set) over resamples of the samples, each side resampled on its own and the features selected
    again each time (so the interval carries the selection's noise): {direction: {aggregation: [lo, hi]}}."""
    pos, neg = sample_codes(pos, "pos"), sample_codes(neg, "neg")
    d = features._d_sae(pos)
    eligible = np.ones(d, bool)
    if max_density is not None:
        density = sample_density(pos, neg) if density is None else np.asarray(density, np.float64)
        eligible = density <= max_density
    toxic_ids = np.unique(_ids(toxic, d, "toxic"))
    per = {}
    for name, m in directions.items():
        p = feature_proximity(np.asarray(m), np.arange(d), toxic_ids, k=k)
        per[name] = {"top_k_mean": p.top_k_mean, "max": p.max, "pair_sum": p.pair_sum,
                     "pair_count": p.pair_count.astype(np.float64), "alive": p.alive}  # fmt: skip
    rng = np.random.default_rng(seed)
    inducing, control = [], []
    for _ in range(resamples):
        a = _take_rows(pos, rng.integers(0, len(pos), len(pos)))
        b = _take_rows(neg, rng.integers(0, len(neg), len(neg)))
        chosen = features.top_features(np.where(eligible, features.label_correlation(a, b), 0.0), top_n)
        inducing.append(np.pad(chosen["positive"], (0, top_n - len(chosen["positive"])), constant_values=-1))
        control.append(np.pad(chosen["negative"], (0, top_n - len(chosen["negative"])), constant_values=-1))
    tails = [(1 - level) / 2 * 100, (1 + level) / 2 * 100]
    out = {}
    for name, values in per.items():
        diffs = _differences(values, [np.array(inducing)], [np.array(control)])
        out[name] = {
            how: ([float(x) for x in np.percentile(v[np.isfinite(v)], tails)] if np.isfinite(v).sum() > 1 else None)
            for how, v in diffs.items()
        }
    return out


# ---------------------------------------------------------------------------- random directions as a reference


def random_max_cosine(d: int, count: int, *, level: float = 0.99) -> dict:
    """The largest of `count` cosines between a random unit direction in R^d and `count` independent random
    unit directions (a feature's nearest neighbour in a random dictionary of count + 1 features, or its
    closest of `count` random toxic features): its mean, standard deviation and `level` quantile.

    One such cosine c has (1 + c) / 2 ~ Beta((d-1)/2, (d-1)/2); given the first direction the count
    cosines are independent, so the maximum has CDF F(c)^count, integrated numerically."""
    if d < 2 or count < 1:
        raise ValueError(f"random_max_cosine: needs d >= 2 and count >= 1, got d={d}, count={count}")
    a = (d - 1) / 2
    grid = np.linspace(-1.0, 1.0, 40001)
    with np.errstate(divide="ignore"):
        log_cdf = np.log(special.betainc(a, a, (1 + grid) / 2))
    cdf_max = np.exp(count * log_cdf)  # P(max <= c)
    mean = 1.0 - np.trapezoid(cdf_max, grid)  # E[X] = b - integral of the CDF over [a, b], here [-1, 1]
    second = 1.0 - np.trapezoid(2 * grid * cdf_max, grid)  # E[X^2] = b^2 - integral of 2x F(x)
    quantile = 2 * special.betaincinv(a, a, level ** (1 / count)) - 1
    return {"d": d, "count": count, "mean": float(mean), "sd": float(np.sqrt(max(second - mean * mean, 0.0))),
            f"q{round(level * 100)}": float(quantile)}  # fmt: skip


def dictionary_structure(nearest_cosine, d: int, *, warn_share: float = 0.1) -> dict:
    """Do a dictionary's nearest-neighbour cosines (each live feature's highest cosine to another feature)
    differ from those of as many random directions in R^d? `share_above_random_q99`: the features whose
    nearest neighbour is closer than 99% of a random dictionary's features' (1% in a random one);
    `like_random` when that share is below `warn_share` (too little structure to carry geometry)."""
    c = np.asarray(nearest_cosine, np.float64).ravel()
    if not len(c):
        raise ValueError("dictionary_structure: no live feature")
    reference = random_max_cosine(d, max(len(c) - 1, 1))
    share = float(np.mean(c > reference["q99"]))
    return {
        "features": int(len(c)),
        "mean_nearest_cosine": float(c.mean()),
        "random_mean": reference["mean"],
        "random_sd": reference["sd"],
        "random_q99": reference["q99"],
        "share_above_random_q99": share,
        "like_random": share < warn_share,
    }


def bootstrap_ci(values, *, resamples: int = 10000, level: float = 0.95, seed: int = 0) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean of `values` (resampling features)."""
    v = np.asarray(values, np.float64).ravel()
    if v.size == 0:
        raise ValueError("bootstrap_ci: no values")
    means = _bootstrap_means(v, resamples, np.random.default_rng(seed))
    tail = (1 - level) / 2 * 100
    return float(np.percentile(means, tail)), float(np.percentile(means, 100 - tail))


def bootstrap_difference_ci(a, b, *, resamples: int = 10000, level: float = 0.95, seed: int = 0):
    """Percentile bootstrap interval of mean(a) - mean(b), each set resampled on its own."""
    a, b = (np.asarray(x, np.float64).ravel() for x in (a, b))
    if not a.size or not b.size:
        raise ValueError(f"bootstrap_difference_ci: both sets need values, got {a.size} and {b.size}")
    rng = np.random.default_rng(seed)
    diff = _bootstrap_means(a, resamples, rng) - _bootstrap_means(b, resamples, rng)
    tail = (1 - level) / 2 * 100
    return float(np.percentile(diff, tail)), float(np.percentile(diff, 100 - tail))


def _bootstrap_means(v: np.ndarray, resamples: int, rng) -> np.ndarray:
    out, done = np.empty(resamples), 0
    while done < resamples:
        block = min(resamples - done, max(1, (1 << 22) // len(v)))
        out[done : done + block] = v[rng.integers(0, len(v), (block, len(v)))].mean(1)
        done += block
    return out


# ---------------------------------------------------------------------------- neighbour search


def cross_neighbours(
    queries, keys, *, k: int = 10, mesh: Mesh | None = None, exclude_self: bool = False
) -> tuple[np.ndarray, np.ndarray]:
    """For each row of `queries` [n, d] its k nearest rows of `keys` [m, d] by cosine: (values [n,k] f32,
    ids [n,k] int32). Dead key rows are never neighbours; dead query rows get ids -1 and values 0.
    exclude_self (queries and keys the same dictionary): a feature is not its own neighbour.
    """
    q_unit, q_alive = unit_rows(queries)
    k_unit, k_alive = unit_rows(keys)
    if q_unit.shape[1] != k_unit.shape[1]:
        raise ValueError(f"the dictionaries read different widths: {q_unit.shape[1]} and {k_unit.shape[1]}")
    live_keys = np.flatnonzero(k_alive)
    available = len(live_keys) - int(exclude_self)
    if not isinstance(k, int) or not 1 <= k <= available:
        raise ValueError(
            f"k={k!r} must be in 1..{available} (live key features{', less itself' if exclude_self else ''})"
        )
    values = np.zeros((len(q_unit), k), np.float32)
    ids = np.full((len(q_unit), k), -1, np.int32)
    live_q = np.flatnonzero(q_alive)
    if len(live_q):
        kk = k + int(exclude_self)
        v, found = similarity_topk(q_unit[live_q], k_unit[live_keys], kk, normalize=False, mesh=mesh)
        v, found = np.asarray(v), live_keys[np.asarray(found)]
        if exclude_self:
            order = np.argsort(found == live_q[:, None], axis=1, kind="stable")[:, :k]
            v, found = np.take_along_axis(v, order, axis=1), np.take_along_axis(found, order, axis=1)
        values[live_q], ids[live_q] = v, found
    return values, ids


def neighbours(directions, *, k: int = 10, mesh: Mesh | None = None) -> tuple[np.ndarray, np.ndarray]:
    """The all-pairs neighbour index of one dictionary: each feature's k nearest other features."""
    return cross_neighbours(directions, directions, k=k, mesh=mesh, exclude_self=True)


# ---------------------------------------------------------------------------- command line


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m emjax.geometry", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    nb = sub.add_parser("neighbours", help="each feature's nearest features (in SAE_B when given)")
    nb.add_argument("sae_a", help="an SAE directory or file emjax.sae.load reads")
    nb.add_argument("sae_b", nargs="?", help="a second SAE: search A's features among B's")
    nb.add_argument("--k", type=int, default=10)
    nb.add_argument("--encoder", action="store_true", help="encoder directions instead of decoder rows")
    nb.add_argument("--out", help="write values and ids to this .safetensors file")
    nb.add_argument("--show", type=int, default=10, help="print the neighbours of the first SHOW features")
    args = parser.parse_args(argv)

    import emjax.sae

    which = "encoder" if args.encoder else "decoder"
    a = sae_directions(emjax.sae.load(args.sae_a), which)
    if args.sae_b:
        values, ids = cross_neighbours(a, sae_directions(emjax.sae.load(args.sae_b), which), k=args.k)
    else:
        values, ids = neighbours(a, k=args.k)
    if args.out:
        artifacts.write_safetensors(
            args.out,
            {"values": values, "ids": ids},
            metadata={"a": args.sae_a, "b": args.sae_b or args.sae_a, "directions": which},
        )
    rows = [
        {
            "feature": i,
            "neighbours (cosine)": ", ".join(f"{j} ({v:.3f})" for j, v in zip(ids[i], values[i]) if j >= 0) or "dead",
        }
        for i in range(min(args.show, len(ids)))
    ]
    sys.stdout.write(markdown_table(rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
