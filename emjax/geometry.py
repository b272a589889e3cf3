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
import io
import math
import sys
from collections.abc import Mapping, Sequence

import numpy as np
from jax.sharding import Mesh

from emjax import artifacts
from emjax.kernels import similarity_topk

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
        values, found = similarity_topk(unit[queries], unit[keys], kk, normalize=False, mesh=mesh)
        values, found = np.asarray(values, np.float64), keys[np.asarray(found)]
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
    from each bin as `sources` has there. Returns the draws, their mean, 95% interval,
    the observed value and the one-sided p-value of observed >= null (observed counted).
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
        "p_value": float((1 + np.sum(null >= observed - _tolerance(observed))) / (1 + draws)),
        "draws": null,
    }


def _tolerance(x: float) -> float:
    """Equal up to float rounding: a permuted sum of the same values can differ in its last bits."""
    return 1e-9 * max(1.0, abs(x))


def permutation_test(
    decoder, a, b, toxic, *, k: int = 1, permutations: int = 10000, seed: int = 0, mesh: Mesh | None = None
) -> dict:
    """One-sided test that set `a` lies closer to `toxic` than set `b`.

    effect = mean proximity of a - mean proximity of b (per-feature top-k mean cosine, dead
    features left out); p_value = (1 + #{permuted effect >= observed}) / (1 + permutations),
    relabelling the pooled features at random with the set sizes kept.
    """
    unit = unit_rows(decoder)
    pa = feature_proximity(decoder, a, toxic, k=k, mesh=mesh, unit=unit)
    pb = feature_proximity(decoder, b, toxic, k=k, mesh=mesh, unit=unit)
    va, vb = pa.top_k_mean[pa.alive], pb.top_k_mean[pb.alive]
    if not len(va) or not len(vb):
        raise ValueError(f"permutation_test: both sets need live features, got {len(va)} and {len(vb)}")
    pooled = np.concatenate([va, vb])
    na, n = len(va), len(pooled)
    total = pooled.sum()

    def effect(sum_a):
        return sum_a / na - (total - sum_a) / (n - na)

    observed = effect(va.sum())
    rng = np.random.default_rng(seed)
    hits, done = 0, 0
    while done < permutations:
        block = min(permutations - done, max(1, (1 << 22) // n))
        choice = rng.permuted(np.broadcast_to(np.arange(n), (block, n)), axis=1)[:, :na]
        hits += int(np.sum(effect(pooled[choice].sum(1)) >= observed - _tolerance(observed)))
        done += block
    return {
        "effect": float(observed),
        "p_value": float((1 + hits) / (1 + permutations)),
        "mean_a": float(va.mean()),
        "mean_b": float(vb.mean()),
        "n_a": int(na),
        "n_b": int(n - na),
        "dead_a": int((~pa.alive).sum()),
        "dead_b": int((~pb.alive).sum()),
        "permutations": permutations,
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


# ---------------------------------------------------------------------------- reporting


def markdown_table(rows: Sequence[Mapping], columns: Sequence[str] | None = None, *, digits: int = 3) -> str:
    """A GitHub Markdown table of `rows` (dicts); floats to `digits` places, numbers right-aligned."""
    if not rows:
        return ""
    columns = list(columns or rows[0].keys())

    def cell(v):
        if v is None:
            return "n/a"  # undefined: never shown as a number
        if isinstance(v, (float, np.floating)):
            return "n/a" if not math.isfinite(v) else f"{v:.{digits}f}"
        if isinstance(v, (list, tuple)):
            return "[" + ", ".join(cell(x) for x in v) + "]"
        return str(v).replace("|", "\\|")

    numeric = [all(isinstance(r.get(c), (int, float, np.number)) for r in rows) for c in columns]
    lines = ["| " + " | ".join(columns) + " |", "|" + "|".join("---:" if n else "---" for n in numeric) + "|"]
    lines += ["| " + " | ".join(cell(r.get(c, "")) for c in columns) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def save_figure(fig, path) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    FigureCanvasAgg(fig)  # a canvas of its own: never touches the global pyplot backend
    buffer = io.BytesIO()
    fig.savefig(buffer, format=str(path).rsplit(".", 1)[-1], bbox_inches="tight", dpi=120)
    artifacts.write_bytes(path, buffer.getvalue())


def plot_layer_proximity(rows: Sequence[Mapping], path, *, title: str = "", ylabel: str = "proximity") -> None:
    """Per-layer proximity with intervals: rows of {"layer": L, group: (value, low, high), ...}
    (e.g. inducing, control, null); one line with error bars per group."""
    from matplotlib.figure import Figure

    if not rows:
        raise ValueError("plot_layer_proximity: no rows")
    groups = [g for g in rows[0] if g != "layer"]
    fig = Figure(figsize=(6, 4))
    ax = fig.add_subplot()
    layers = np.array([r["layer"] for r in rows], float)
    width = 0.08 * (np.ptp(layers) or 1)
    for i, g in enumerate(groups):
        value, low, high = (np.array([r[g][j] for r in rows], float) for j in range(3))
        x = layers + (i - (len(groups) - 1) / 2) * width
        ax.errorbar(x, value, yerr=[value - low, high - value], marker="o", capsize=3, label=g)
    ax.set_xlabel("layer")
    ax.set_ylabel(ylabel)
    ax.set_xticks(layers)
    ax.set_title(title)
    ax.legend()
    save_figure(fig, path)


def plot_max_cosine_histograms(groups: Mapping[str, np.ndarray], path, *, bins: int = 30, title: str = "") -> None:
    """Overlaid histograms of per-feature max cosine to the toxic set, one per named feature set."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6, 4))
    ax = fig.add_subplot()
    values = [np.asarray(np.ma.compressed(np.ma.asarray(v)), float) for v in groups.values()]
    edges = np.histogram_bin_edges(np.concatenate(values) if values else [0.0, 1.0], bins=bins)
    for name, v in zip(groups, values):
        ax.hist(v, bins=edges, alpha=0.5, label=f"{name} (n={len(v)})", density=True)
    ax.set_xlabel("max cosine to a toxic feature")
    ax.set_ylabel("density")
    ax.set_title(title)
    ax.legend()
    save_figure(fig, path)


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
