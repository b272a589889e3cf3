"""Streaming SAE feature statistics: tokens -> model -> SAE on the device, sums on the host, never token activations.

    forward = emjax.models.jit_forward(model, capture=layers, stop_at_layer=max(layers) + 1)
    summary = stream_features(forward, {12: sae}, tokens, attention_mask, count_mask, out, mesh=mesh,
                              batch_size=32, rows_per_chunk=1024)
    stats, codes = load_layer(out, 12)

Only the tokens where `count_mask` is set count (the assistant tokens of a chat,
or every real token). Per layer and feature: tokens seen, firing count
(activation > 0), sum, sum of squares, max. Per sample: the SAE code
mean-pooled over its counted tokens (kept sparse: every non-zero value and its
feature id, or only the `top_codes` largest) and the mean residual [d_model]. SAE quality
(L0, FVU, dead fraction) comes from the same pass. SAE activations are
non-negative for every architecture in emjax.sae, so a feature that never
fires has max 0.

Layout under `out` (every file written atomically by process 0):
    chunks/{c:05d}.safetensors   rows c*R .. c*R+R-1, all layers: the partial sums of that chunk and its
                                 samples (keys "layer{L}/<name>"); a chunk is done when its file exists
    layer{L}/stats.safetensors   the totals (LayerStats fields)
    layer{L}/samples.safetensors codes_values [N,k] f32, codes_indices [N,k] i32 (rows with fewer non-zero
                                 values padded with value 0 at id 0), mean_residual [N,D] f32,
                                 sample_tokens [N] i32 (counted tokens per sample)
    summary.json                 rows, chunks, layers, per-layer d_sae and quality, tokens/s
A rerun skips the chunks on disk (after checking that they were written with
the same settings), so a killed run resumes and ends with the same files.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import time
from collections.abc import Callable, Mapping
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import safetensors
import safetensors.numpy
from flax import nnx
from jax.sharding import Mesh
from tqdm.auto import tqdm

from emjax import artifacts, distributed

_log = logging.getLogger(__name__)

STAT_FIELDS = ("tokens", "fire_count", "sum", "sum_sq", "max", "sse", "resid_mean", "resid_m2")
SAMPLE_FIELDS = ("codes_values", "codes_indices", "mean_residual", "sample_tokens")


@dataclasses.dataclass
class LayerStats:
    """Totals over the counted tokens of one layer (float64 sums, combined chunk by chunk in order)."""

    tokens: int
    fire_count: np.ndarray  # [d_sae] int64: tokens with activation > 0
    sum: np.ndarray  # [d_sae] float64
    sum_sq: np.ndarray  # [d_sae] float64
    max: np.ndarray  # [d_sae] float32
    sse: float  # sum over tokens of |x - decode(encode(x))|^2
    resid_mean: np.ndarray  # [d_model] float64: mean residual over the counted tokens
    resid_m2: float  # sum over tokens of |x - resid_mean|^2 (the total variance times tokens)

    @property
    def d_sae(self) -> int:
        return len(self.fire_count)

    @property
    def density(self) -> np.ndarray:
        """Share of counted tokens on which each feature fires."""
        return self.fire_count / max(self.tokens, 1)

    @property
    def mean(self) -> np.ndarray:
        return self.sum / max(self.tokens, 1)

    @property
    def std(self) -> np.ndarray:
        return np.sqrt(np.maximum(self.sum_sq / max(self.tokens, 1) - self.mean**2, 0.0))

    @classmethod
    def empty(cls, d_sae: int, d_model: int) -> LayerStats:
        return cls(
            tokens=0,
            fire_count=np.zeros(d_sae, np.int64),
            sum=np.zeros(d_sae),
            sum_sq=np.zeros(d_sae),
            max=np.zeros(d_sae, np.float32),
            sse=0.0,
            resid_mean=np.zeros(d_model),
            resid_m2=0.0,
        )

    def add(self, other: LayerStats) -> None:
        """Fold in another part; the residual variance combines by Chan's parallel formula (no cancellation)."""
        n_a, n_b = self.tokens, other.tokens
        n = n_a + n_b
        if n_b:
            delta = other.resid_mean - self.resid_mean
            self.resid_m2 = self.resid_m2 + other.resid_m2 + float(delta @ delta) * n_a * n_b / n
            self.resid_mean = self.resid_mean + delta * (n_b / n)
        self.tokens = n
        self.fire_count = self.fire_count + other.fire_count
        self.sum = self.sum + other.sum
        self.sum_sq = self.sum_sq + other.sum_sq
        self.max = np.maximum(self.max, other.max)
        self.sse = self.sse + other.sse

    def to_arrays(self) -> dict[str, np.ndarray]:
        out = {}
        for name in STAT_FIELDS:
            value = getattr(self, name)
            out[name] = (
                np.asarray([value], np.int64 if name == "tokens" else np.float64) if np.isscalar(value) else value
            )
        return out

    @classmethod
    def from_arrays(cls, arrays: Mapping[str, np.ndarray]) -> LayerStats:
        scalar = {"tokens": int, "sse": float, "resid_m2": float}
        return cls(**{k: scalar[k](arrays[k][0]) if k in scalar else arrays[k] for k in STAT_FIELDS})


@dataclasses.dataclass
class SampleCodes:
    """Per-sample mean-pooled SAE codes, sparse: the top values of each row and their feature ids."""

    values: np.ndarray  # [N, k] float32
    indices: np.ndarray  # [N, k] int32
    d_sae: int

    def __len__(self) -> int:
        return len(self.values)

    def dense(self, rows=slice(None)) -> np.ndarray:
        """[n, d_sae] float32 (entries outside the kept values are 0)."""
        values, indices = self.values[rows], self.indices[rows]
        out = np.zeros((len(values), self.d_sae), np.float32)
        # Added, not put: a row's zero-valued padding entries share id 0 with a real value there.
        np.add.at(out, (np.arange(len(values))[:, None], indices.astype(np.int64)), values)
        return out


def sample_codes(codes, what: str):
    """Per-sample codes as given: SampleCodes, else a dense [N, d_sae] array (any other shape is an error
    naming `what`)."""
    if isinstance(codes, SampleCodes):
        return codes
    x = np.asarray(codes)
    if x.ndim != 2:
        raise ValueError(f"{what}: expected per-sample codes [N, d_sae], got shape {x.shape}")
    return x


def sae_quality(stats: LayerStats) -> dict:
    """L0 (active features per token), FVU = SSE / total variance, explained variance, dead fraction."""
    tokens = max(stats.tokens, 1)
    fvu = stats.sse / stats.resid_m2 if stats.resid_m2 > 0 else float("nan")
    return {
        "tokens": stats.tokens,
        "d_sae": stats.d_sae,
        "l0": float(stats.fire_count.sum() / tokens),
        "mse": float(stats.sse / tokens),
        "fvu": float(fvu),
        "explained_variance": float(1.0 - fvu),
        "dead_fraction": float(np.mean(stats.fire_count == 0)),
    }


# ---------------------------------------------------------------------------- the device step


@functools.partial(jax.jit, static_argnames=("graphdef", "top", "samples"))
def _layer_step(state, x, count, *, graphdef, top: int | None, samples: bool):
    """(SAE state, x [B,T,D], count [B,T]) -> this batch's sums, pooled codes (top values, or all of
    them when `top` is None), mean residuals."""
    sae = nnx.merge(graphdef, state)
    x = x.astype(jnp.float32)
    f = sae.encode(x)  # [B,T,d_sae] fp32
    w = count.astype(jnp.float32)
    per_sample = w.sum(1)  # [B]
    n = per_sample.sum()
    cw = w[..., None]
    fired = (f > 0) & (cw > 0)
    err = x - sae.decode(f)
    mu = (x * cw).sum((0, 1)) / jnp.maximum(n, 1.0)
    out = {
        "tokens": n,
        "fire_count": fired.sum((0, 1), dtype=jnp.int32),
        "sum": (f * cw).sum((0, 1)),
        "sum_sq": (f * f * cw).sum((0, 1)),
        "max": jnp.where(cw > 0, f, 0.0).max((0, 1)),
        "sse": (err * err * cw).sum(),
        "resid_mean": mu,
        # Centred on this batch's mean; batches combine by Chan's formula on the host.
        "resid_m2": (jnp.square(x - mu) * cw).sum(),
    }
    if samples:
        denom = jnp.maximum(per_sample, 1.0)[:, None]
        pooled = (f * cw).sum(1) / denom
        if top is None:
            out["pooled"] = pooled  # made sparse on the host: how many are non-zero varies by row
        else:
            out["codes_values"], out["codes_indices"] = jax.lax.top_k(pooled, top)
        out["mean_residual"] = (x * cw).sum(1) / denom
        out["tokens_per_sample"] = per_sample
    return out


def _host_stats(out: Mapping[str, np.ndarray]) -> LayerStats:
    return LayerStats(
        tokens=int(round(float(out["tokens"]))),
        fire_count=out["fire_count"].astype(np.int64),
        sum=out["sum"].astype(np.float64),
        sum_sq=out["sum_sq"].astype(np.float64),
        max=out["max"].astype(np.float32),
        sse=float(out["sse"]),
        resid_mean=out["resid_mean"].astype(np.float64),
        resid_m2=float(out["resid_m2"]),
    )


# ---------------------------------------------------------------------------- the stream


def sae_states(saes: Mapping[int, nnx.Module], mesh=None):
    """(layers, {layer: graphdef}, {layer: state}) of {layer: SAE} for a jitted pass; with a mesh, SAE weights
    not yet on it are replicated over it."""
    layers = tuple(sorted(saes))
    if not layers:
        raise ValueError("no SAEs given: pass {layer: sae}")
    parts = {layer: nnx.split(saes[layer]) for layer in layers}
    states = {layer: state for layer, (_, state) in parts.items()}
    if mesh is not None:
        states = distributed.onto_mesh(states, mesh)
    return layers, {layer: graphdef for layer, (graphdef, _) in parts.items()}, states


def padded_batches(tokens: np.ndarray, mask: np.ndarray, batch_size: int, mesh, rules):
    """(ids, mask) batches of token rows [rows, length], each a multiple of the data shards (padding rows
    masked out), placed on the mesh (host arrays without one): distributed.padded_batches of the two."""
    if tokens.shape != mask.shape or tokens.ndim != 2:
        raise ValueError(f"tokens {tokens.shape} and mask {mask.shape} must both be [rows, length]")
    arrays = {"ids": np.asarray(tokens, np.int32), "mask": np.asarray(mask, np.int32)}
    for batch in distributed.padded_batches(arrays, batch_size, mesh, rules):
        yield batch["ids"], batch["mask"]


def chunk_path(out: Path, chunk: int) -> Path:
    return Path(out) / "chunks" / f"{chunk:05d}.safetensors"


def _check_inputs(tokens, attention_mask, count_mask, saes) -> None:
    if tokens.ndim != 2:
        raise ValueError(f"tokens must be [rows, seq], got shape {tokens.shape}")
    for name, m in (("attention_mask", attention_mask), ("count_mask", count_mask)):
        if m.shape != tokens.shape:
            raise ValueError(f"{name} has shape {m.shape}, but tokens have shape {tokens.shape}")
    outside = (count_mask > 0) & (attention_mask == 0)
    if outside.any():
        row, pos = np.argwhere(outside)[0]
        raise ValueError(f"count_mask marks padding (row {row}, position {pos}): counted tokens must be real tokens")
    if not saes:
        raise ValueError("no SAEs given: pass {layer: sae}")


def stream_features(
    forward: Callable,
    saes: Mapping[int, nnx.Module],
    tokens: np.ndarray,
    attention_mask: np.ndarray,
    count_mask: np.ndarray,
    out: str | Path,
    *,
    mesh: Mesh,
    rules=None,
    batch_size: int,
    rows_per_chunk: int,
    top_codes: int | None = None,
    samples: bool = True,
    progress: bool = True,
) -> dict:
    """Stream all rows through `forward` and each layer's SAE; write the layout in the module docstring.

    forward: emjax.models.jit_forward(model, capture=sorted(saes), stop_at_layer=max(saes) + 1)
    (any f(ids, mask) whose `.captured[layer]` is [B,T,d_model]). saes: layer -> SAE, on `mesh` or
    on one device (then replicated). top_codes: None keeps every non-zero pooled value of a sample (the
    label correlation then sees every feature of every sample), else its largest ones. samples=False
    skips the per-sample codes and residuals (a quality-only pass). Returns the summary also written to summary.json.
    """
    out = Path(out)
    tokens, attention_mask, count_mask = (np.asarray(a) for a in (tokens, attention_mask, count_mask))
    _check_inputs(tokens, attention_mask, count_mask, saes)
    layers = tuple(sorted(saes))
    rows = tokens.shape[0]
    batch = distributed.global_batch(batch_size, mesh, rules)  # padding rows count nothing
    num_chunks = -(-rows // rows_per_chunk)
    steps, states, settings = {}, {}, {}
    for layer in layers:
        sae = saes[layer]
        top = None if top_codes is None else min(top_codes, sae.d_sae)
        graphdef, state = nnx.split(sae)
        steps[layer] = functools.partial(_layer_step, graphdef=graphdef, top=top, samples=samples)
        states[layer] = distributed.onto_mesh(jax.tree.map(jnp.asarray, state), mesh)
        settings[f"layer{layer}"] = {"d_sae": sae.d_sae, "d_in": sae.d_in, "top": top}
    settings = {"rows": rows, "rows_per_chunk": rows_per_chunk, "samples": samples, "layers": settings}

    main = distributed.is_main_process()
    if main:
        (out / "chunks").mkdir(parents=True, exist_ok=True)
    done = [c for c in range(num_chunks) if chunk_path(out, c).is_file()]
    for c in done:
        _check_chunk(chunk_path(out, c), settings)
    todo = [c for c in range(num_chunks) if c not in done]
    if done:
        _log.info("features: resuming, %d of %d chunks already written", len(done), num_chunks)
    real = attention_mask > 0
    todo_tokens = int(sum(real[c * rows_per_chunk : (c + 1) * rows_per_chunk].sum() for c in todo))
    bar = tqdm(total=todo_tokens, unit="tok", unit_scale=True, desc="features", disable=not (main and progress))
    start, seen = time.perf_counter(), 0
    for i, c in enumerate(todo):
        lo, hi = c * rows_per_chunk, min(rows, (c + 1) * rows_per_chunk)
        arrays = _run_chunk(
            forward, steps, states, tokens[lo:hi], attention_mask[lo:hi], count_mask[lo:hi], batch, mesh, rules
        )
        if main:
            meta = {"settings": json.dumps(settings, sort_keys=True), "rows": f"{lo}:{hi}"}
            artifacts.write_safetensors(chunk_path(out, c), arrays, metadata=meta)
        chunk_tokens = int(real[lo:hi].sum())
        seen += chunk_tokens
        bar.update(chunk_tokens)
        rate = seen / max(time.perf_counter() - start, 1e-9)
        _log.info("features: chunk %d/%d, %.0f tok/s, ETA %.0f s", i + 1, len(todo), rate, (todo_tokens - seen) / rate)
    bar.close()
    seconds = time.perf_counter() - start
    distributed.sync_processes("features-chunks")
    summary = {
        "rows": rows,
        "chunks": num_chunks,
        "resumed_chunks": len(done),
        "global_batch": batch,
        "counted_tokens": int((count_mask > 0).sum()),
        "tokens_per_second": round(todo_tokens / seconds, 1) if todo else None,
        "layers": {},
    }
    for layer in layers:
        stats, sample_arrays = _combine(out, num_chunks, layer, settings, samples)
        summary["layers"][str(layer)] = {"d_sae": stats.d_sae, "quality": sae_quality(stats)}
        if main:
            (out / f"layer{layer}").mkdir(exist_ok=True)
            artifacts.write_safetensors(out / f"layer{layer}" / "stats.safetensors", stats.to_arrays())
            if samples:
                artifacts.write_safetensors(out / f"layer{layer}" / "samples.safetensors", sample_arrays)
    if main:
        artifacts.write_json(out / "summary.json", summary)
    return summary


def _run_chunk(forward, steps, states, tokens, attention_mask, count_mask, batch, mesh, rules) -> dict:
    """The partial results of one chunk of rows: {"layer{L}/<name>": array}."""
    n = len(tokens)
    totals = {layer: None for layer in steps}
    per_sample = {layer: {name: [] for name in SAMPLE_FIELDS} for layer in steps}
    for b in range(0, n, batch):
        real = min(n, b + batch) - b
        ids, mask, count = (_padded(a[b : b + real], batch) for a in (tokens, attention_mask, count_mask))
        local = distributed.process_slice(batch)
        placed = distributed.shard_batch({"ids": ids[local], "mask": mask[local], "count": count[local]}, mesh, rules)
        captured = forward(placed["ids"], placed["mask"]).captured
        for layer, step in steps.items():
            result = {
                k: distributed.gather_to_host(v)
                for k, v in step(states[layer], captured[layer], placed["count"]).items()
            }
            part = _host_stats(result)
            if totals[layer] is None:
                totals[layer] = LayerStats.empty(part.d_sae, len(part.resid_mean))
            totals[layer].add(part)
            if "pooled" in result:
                result["codes_values"], result["codes_indices"] = _nonzero_rows(result.pop("pooled"))
            if "codes_values" in result:
                samples = per_sample[layer]
                samples["codes_values"].append(result["codes_values"][:real].astype(np.float32))
                samples["codes_indices"].append(result["codes_indices"][:real].astype(np.int32))
                samples["mean_residual"].append(result["mean_residual"][:real].astype(np.float32))
                samples["sample_tokens"].append(np.rint(result["tokens_per_sample"][:real]).astype(np.int32))
    arrays = {}
    for layer in steps:
        for name, value in totals[layer].to_arrays().items():
            arrays[f"layer{layer}/{name}"] = value
        for name, parts in per_sample[layer].items():
            if parts:
                arrays[f"layer{layer}/{name}"] = _concat_ragged(parts)
    return arrays


def _nonzero_rows(pooled: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Every non-zero value of each row of pooled [B, d_sae], largest first, and its feature id: [B, w]
    with w the most any row has (at least 1); shorter rows padded with value 0 at id 0."""
    nonzero = pooled != 0
    width = max(1, int(nonzero.sum(1).max()))
    order = np.argsort(np.where(nonzero, -pooled, np.inf), axis=1, kind="stable")[:, :width]
    values = np.take_along_axis(pooled, order, axis=1)
    keep = np.take_along_axis(nonzero, order, axis=1)
    return np.where(keep, values, 0.0).astype(np.float32), np.where(keep, order, 0).astype(np.int32)


def _concat_ragged(parts: list[np.ndarray]) -> np.ndarray:
    """Rows of every part; [n, w] parts of different widths w padded with zeros (value 0 at id 0)."""
    if parts[0].ndim == 1:
        return np.concatenate(parts)
    width = max(p.shape[1] for p in parts)
    return np.concatenate([np.pad(p, ((0, 0), (0, width - p.shape[1]))) for p in parts])


def _padded(x: np.ndarray, rows: int) -> np.ndarray:
    return np.concatenate([x, np.zeros((rows - len(x), *x.shape[1:]), x.dtype)]) if len(x) < rows else x


def _check_chunk(path: Path, settings: dict) -> None:
    try:
        with safetensors.safe_open(str(path), "numpy") as f:
            written = json.loads((f.metadata() or {}).get("settings", "null"))
    except Exception as e:  # a truncated or foreign file
        raise ValueError(f"{path}: unreadable chunk file ({e}); delete it to recompute the chunk") from e
    if written != settings:
        raise ValueError(
            f"{path}: written with other settings ({written}), not {settings}; use a fresh output directory"
        )


def _combine(out: Path, num_chunks: int, layer: int, settings: dict, samples: bool):
    stats, sample_parts = None, {name: [] for name in SAMPLE_FIELDS}
    for c in range(num_chunks):
        path = chunk_path(out, c)
        _check_chunk(path, settings)
        arrays = safetensors.numpy.load_file(str(path))
        prefix = f"layer{layer}/"
        part = LayerStats.from_arrays({k[len(prefix) :]: v for k, v in arrays.items() if k.startswith(prefix)})
        if stats is None:
            stats = LayerStats.empty(part.d_sae, len(part.resid_mean))
        stats.add(part)
        if samples:
            for name in SAMPLE_FIELDS:
                sample_parts[name].append(arrays[prefix + name])
    return stats, ({k: _concat_ragged(v) for k, v in sample_parts.items()} if samples else None)


# ---------------------------------------------------------------------------- reading the results


def load_stats(out: str | Path, layer: int) -> LayerStats:
    path = Path(out) / f"layer{layer}" / "stats.safetensors"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no feature statistics for layer {layer} (run stream_features first)")
    return LayerStats.from_arrays(safetensors.numpy.load_file(str(path)))


def load_samples(out: str | Path, layer: int) -> tuple[SampleCodes, np.ndarray, np.ndarray]:
    """(pooled codes, mean residuals [N, d_model], counted tokens per sample [N]) of one layer."""
    path = Path(out) / f"layer{layer}" / "samples.safetensors"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no per-sample codes for layer {layer} (run stream_features with samples)")
    arrays = safetensors.numpy.load_file(str(path))
    d_sae = len(load_stats(out, layer).fire_count)
    codes = SampleCodes(arrays["codes_values"], arrays["codes_indices"], d_sae)
    return codes, arrays["mean_residual"], arrays["sample_tokens"]
