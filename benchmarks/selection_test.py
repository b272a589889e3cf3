"""Claim 1's selection permutation test (labels permuted, features re-selected) against the plain loop.

    python benchmarks/selection_test.py --preset=cpu   # 2,000 samples x 16,384 features, 1,000 permutations
    python benchmarks/selection_test.py --preset=gpu   # the same data, 10,000 permutations

Rows: emjax.geometry.selection_permutation_test (one matrix product per batch of permutations on the
device, top features per block merged on the host), and the loop a study would write first: per
permutation, features.label_correlation on the shuffled samples, features.top_features, the mean
proximity of the two sets (proximities precomputed once, as in emjax). The loop runs `--loop` permutations
and is extrapolated linearly. Sparse pooled codes (400 non-zero features per sample), decoder d_model 2304,
100 toxic features, top 100 per side.
"""

from __future__ import annotations

import argparse
import time

import jax
import numpy as np

from emjax import features, geometry
from emjax.feature_stats import SampleCodes

PRESETS = {"cpu": dict(permutations=1000, loop=20), "gpu": dict(permutations=10000, loop=20)}


def data(samples: int, d_sae: int, nonzero: int, d_model: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    ids = np.argsort(rng.random((samples, d_sae)), axis=1)[:, :nonzero].astype(np.int32)
    values = rng.exponential(size=(samples, nonzero)).astype(np.float32)
    half = samples // 2
    pos = SampleCodes(values[:half], ids[:half], d_sae)
    neg = SampleCodes(values[half:], ids[half:], d_sae)
    decoder = rng.normal(size=(d_sae, d_model)).astype(np.float32)
    return pos, neg, decoder, rng.choice(d_sae, 100, replace=False)


def plain_loop(pos, neg, decoder, toxic, permutations: int, top_n: int = 100) -> float:
    """Seconds for `permutations` permutations the straightforward way."""
    prox = geometry.feature_proximity(decoder, np.arange(pos.d_sae), toxic)
    rows = SampleCodes(np.concatenate([pos.values, neg.values]), np.concatenate([pos.indices, neg.indices]), pos.d_sae)
    rng = np.random.default_rng(0)
    start = time.perf_counter()
    for _ in range(permutations):
        order = rng.permutation(len(rows))
        a = SampleCodes(rows.values[order[: len(pos)]], rows.indices[order[: len(pos)]], pos.d_sae)
        b = SampleCodes(rows.values[order[len(pos) :]], rows.indices[order[len(pos) :]], pos.d_sae)
        chosen = features.top_features(features.label_correlation(a, b), top_n)
        prox.top_k_mean[chosen["positive"]].mean() - prox.top_k_mean[chosen["negative"]].mean()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", choices=sorted(PRESETS), default="cpu")
    parser.add_argument("--samples", type=int, default=2000)
    parser.add_argument("--d_sae", type=int, default=16384)
    args = parser.parse_args()
    preset = PRESETS[args.preset]
    print("device:", jax.devices()[0].device_kind, "| jax", jax.__version__)
    pos, neg, decoder, toxic = data(args.samples, args.d_sae, 400, 2304)
    geometry.selection_permutation_test(pos, neg, decoder, toxic, top_n=100, permutations=128)  # compile
    start = time.perf_counter()
    result = geometry.selection_permutation_test(pos, neg, decoder, toxic, top_n=100,
                                                 permutations=preset["permutations"])  # fmt: skip
    ours = time.perf_counter() - start
    loop = plain_loop(pos, neg, decoder, toxic, preset["loop"]) * preset["permutations"] / preset["loop"]
    n = preset["permutations"]
    print(f"| run | {n} permutations, s | permutations/s |\n|---|---:|---:|")
    print(f"| emjax selection_permutation_test | {ours:.1f} | {n / ours:.0f} |")
    print(f"| plain loop (label_correlation + top_features), extrapolated from {preset['loop']} | {loop:.1f} | "
          f"{n / loop:.1f} |")  # fmt: skip
    print(f"speed-up {loop / ours:.1f}x; p_two_sided {result['p_two_sided']:.3f} (no planted effect)")


if __name__ == "__main__":
    main()
