"""Residual-stream extraction to resumable shard files, and streaming statistics over them.

Layout under the stage directory, for shard s (rows s*R .. s*R+R-1 of the tokenized data):
    layer{L}/{s:05d}.npy   [n, d_model] activations of the kept tokens (the real ones, or those `keep` marks)
    index/{s:05d}.npy      [n, 2] int32 (row, position) of each of those tokens
The index file is written last: a shard is complete when it exists.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from emjax import artifacts, distributed

_log = logging.getLogger(__name__)


def shard_paths(out: Path, shard: int, layers) -> tuple[Path, dict[int, Path]]:
    return out / "index" / f"{shard:05d}.npy", {layer: out / f"layer{layer}" / f"{shard:05d}.npy" for layer in layers}


def extract_residuals(
    forward,
    tokens: np.ndarray,
    mask: np.ndarray,
    out: Path,
    *,
    layers,
    batch_size: int,
    rows_per_shard: int,
    mesh,
    rules,
    dtype: str,
    keep: np.ndarray | None = None,
) -> dict:
    """Run `forward` (emjax.models.jit_forward with capture=layers) over all rows, shard by shard, and store
    the activations of the real tokens (of those `keep` [rows, seq] marks, when given: a subset of them).

    Shards already on disk are skipped, so a killed run resumes where it stopped.
    """
    keep = mask if keep is None else keep
    if keep.shape != mask.shape or ((keep > 0) & (mask == 0)).any():
        raise ValueError(f"keep {keep.shape} must mark real tokens of the mask {mask.shape} only")
    rows = tokens.shape[0]
    batch = distributed.global_batch(batch_size, mesh, rules)
    if batch != batch_size:
        _log.info("extract: batch %d rounded up to %d to divide over %d data shards", batch_size, batch,
                  distributed.data_parallel_size(mesh, rules))  # fmt: skip
    num_shards = -(-rows // rows_per_shard)
    main = distributed.is_main_process()
    if main:
        for directory in ["index"] + [f"layer{layer}" for layer in layers]:
            (out / directory).mkdir(parents=True, exist_ok=True)
    done = [s for s in range(num_shards) if shard_paths(out, s, layers)[0].is_file()]
    todo = [s for s in range(num_shards) if s not in done]
    if done:
        _log.info("extract: resuming, %d of %d shards already written", len(done), num_shards)
    total_tokens = int(sum(keep[s * rows_per_shard : (s + 1) * rows_per_shard].sum() for s in todo))
    progress = tqdm(total=total_tokens, unit="tok", unit_scale=True, desc="extract", disable=not main)
    start = time.perf_counter()
    for shard in todo:
        lo, hi = shard * rows_per_shard, min(rows, (shard + 1) * rows_per_shard)
        acts = {layer: [] for layer in layers}
        for b in range(lo, hi, batch):
            ids, valid = _padded(tokens[b : min(hi, b + batch)], batch), _padded(mask[b : min(hi, b + batch)], batch)
            local = distributed.process_slice(batch)
            placed = distributed.shard_batch({"ids": ids[local], "mask": valid[local]}, mesh, rules)
            captured = forward(placed["ids"], placed["mask"]).captured
            real = _padded(keep[b : min(hi, b + batch)], batch).astype(bool)
            for layer in layers:
                acts[layer].append(distributed.gather_to_host(captured[layer])[real].astype(dtype))
            progress.update(int(real.sum()))
        if main:
            row_ids, positions = np.nonzero(keep[lo:hi])
            index_path, layer_paths = shard_paths(out, shard, layers)
            for layer in layers:
                artifacts.save_npy(layer_paths[layer], np.concatenate(acts[layer]))
            artifacts.save_npy(index_path, np.stack([row_ids + lo, positions], axis=1).astype(np.int32))
    progress.close()
    seconds = time.perf_counter() - start
    return {
        "shards": num_shards,
        "resumed_shards": len(done),
        "tokens": int(keep.sum()),
        "tokens_per_second": round(total_tokens / seconds, 1) if todo else None,
        "global_batch": batch,
    }


def _padded(x: np.ndarray, rows: int) -> np.ndarray:
    return np.concatenate([x, np.zeros((rows - len(x), *x.shape[1:]), x.dtype)]) if len(x) < rows else x


def summarize_layer(files: list[Path], top: int = 8) -> dict:
    """Streaming statistics of one layer's activations (float64 sums, exact norm percentiles)."""
    count, total, total_sq, norms = 0, None, None, []
    for f in files:
        x = np.load(f, allow_pickle=False).astype(np.float64)
        count += len(x)
        total = x.sum(0) if total is None else total + x.sum(0)
        total_sq = (x * x).sum(0) if total_sq is None else total_sq + (x * x).sum(0)
        norms.append(np.linalg.norm(x, axis=1))
    if not count:
        raise ValueError(f"no activations in {files[:1] or 'an empty shard list'}")
    mean = total / count
    var = np.maximum(total_sq / count - mean * mean, 0.0)
    norms = np.concatenate(norms)
    outliers = np.argsort(-np.abs(mean))[:top]
    return {
        "tokens": count,
        "d_model": len(mean),
        "norm": {
            "mean": float(norms.mean()),
            **{f"p{q}": float(np.percentile(norms, q)) for q in (5, 50, 95)},
            "max": float(norms.max()),
        },
        "mean_vector_norm": float(np.linalg.norm(mean)),
        "mean_variance": float(var.mean()),
        "outlier_dims": [{"dim": int(d), "mean": float(mean[d]), "std": float(np.sqrt(var[d]))} for d in outliers],
    }


def text_tokens(tokens: np.ndarray, mask: np.ndarray, bos_id: int | None) -> np.ndarray:
    """The real tokens less position 0 and any BOS token, as a 0/1 mask: their residuals (attention sinks, norms
    far above the rest) are no text to train or judge an SAE on."""
    keep = (mask > 0) & (np.arange(tokens.shape[1]) > 0)
    if bos_id is not None:
        keep &= tokens != bos_id
    return keep.astype(np.int8)


def summary_table(stats: dict) -> str:
    """summarize_layer's statistics per layer as a fixed-width text table."""
    lines = [f"{'layer':>5} {'tokens':>8} {'mean |h|':>10} {'p50 |h|':>10} {'p95 |h|':>10}  top outlier dims"]
    for layer, s in stats.items():
        dims = ", ".join(f"{o['dim']}:{o['mean']:+.2f}" for o in s["outlier_dims"][:3])
        lines.append(f"{layer:>5} {s['tokens']:>8} {s['norm']['mean']:>10.3f} {s['norm']['p50']:>10.3f} "
                     f"{s['norm']['p95']:>10.3f}  {dims}")  # fmt: skip
    return "\n".join(lines)
