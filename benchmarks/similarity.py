"""Exact top-k similarity search: emjax vs the usual baselines, same machine, one run.

    python benchmarks/similarity.py --preset=cpu      # CPU, fp32, sizes that finish in ~2 minutes
    python benchmarks/similarity.py --preset=gpu      # GPU, bf16, 16384 queries x 131072 keys x 2304, k=32
    python benchmarks/similarity.py --preset=gpu --side=emjax --sweep   # as gpu.sh runs it (torch: --side=peer)

The GPU size is 9.9e15 FLOP (2 n m d), 15 ms at 650 TFLOP/s: a few timed
passes fit a one-minute budget (131k x 131k was 8x that, 1M x 131k 64x).

Rows: the emjax Pallas kernel (GPU/TPU only: on CPU it runs only in interpret
mode, which is an emulator, not a timing), the emjax blocked XLA path, one
full matmul + lax.top_k where the n x m matrix fits in memory, torch matmul +
topk in query chunks, and faiss IndexFlatIP (CPU runs only; faiss-cpu has no
GPU index). All search unit-normalised vectors, i.e. cosine similarity.
lax.top_k in jax 0.10 has no is_stable switch; XLA picks its own selection.

Each row reports the best of several timed runs after a warm-up, the achieved
similarity rate as a fraction of this device's measured dense matmul rate in
the same dtype (2 n m d FLOPs), and the share of rows whose top-1 key agrees
with the emjax XLA path (ties and rounding may differ, mostly in bf16).
--sweep adds kernel rows with other block sizes and key splits (GPU), to
show which default the hardware prefers. With --side=emjax or --side=peer
(gpu.sh: each side in its own process) the data is drawn on the device by
each side and the agreement column compares emjax's own paths only.
"""

from __future__ import annotations

import argparse
import functools
import os
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

sys.path.insert(0, str(Path(__file__).parent))
from bench_rows import emit, missing_module, skip_peer  # noqa: E402
from forward import add_side_argument  # noqa: E402

from emjax.kernels import similarity_topk  # noqa: E402
from emjax.kernels.similarity_pallas import topk_pallas  # noqa: E402
from emjax.kernels.topk_merge import normalize_rows  # noqa: E402

PRESETS = {
    "tiny": dict(shapes=[(512, 4096, 128)], k=8, dtype="float32", repeats=1),  # gpu.sh's plumbing check on a CPU
    "cpu": dict(shapes=[(8192, 65536, 256), (2048, 32768, 2304)], k=32, dtype="float32", repeats=2),
    "gpu": dict(shapes=[(16384, 131072, 2304)], k=32, dtype="bfloat16", repeats=3),
}
# --sweep: kernel settings tried besides the defaults (emjax.kernels.similarity_pallas.default_blocks).
SWEEP = (
    dict(key_splits=1),
    dict(key_splits=8),
    dict(block_keys=256),
    dict(num_stages=4),
)
# Largest similarity matrix the "full matmul + top_k" baseline may materialise.
FULL_MATRIX_BYTES = {"cpu": 4 << 30, "gpu": 32 << 30, "tpu": 32 << 30}


def best_time(fn, repeats: int) -> tuple[float, object]:
    result = fn()  # warm-up: compilation, allocation
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - start)
    return min(times), result


def matmul_rate(d: int, dtype, repeats: int) -> float:
    """Measured FLOP/s of one large dense matmul in `dtype` (fp32 accumulation), the roofline used below."""
    size = 4096 if jax.default_backend() == "cpu" else 16384
    a = jnp.ones((size, d), dtype)
    b = jnp.ones((size, d), dtype)
    mm = jax.jit(lambda a, b: lax.dot_general(a, b, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32))
    seconds, _ = best_time(lambda: mm(a, b).block_until_ready(), repeats)
    return 2 * size * size * d / seconds


def unit_rows(rng, rows: int, d: int) -> np.ndarray:
    x = rng.standard_normal((rows, d), dtype=np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def emjax_search(method: str, q, keys, k: int):
    # emjax normalises the rows itself (cosine); the baselines get unit rows, so emjax pays one extra O((n+m) d) pass.
    return lambda: jax.block_until_ready(similarity_topk(q, keys, k, normalize=True, method=method))


def full_matmul_topk(q, keys, k: int):
    search = jax.jit(
        lambda q, keys: lax.top_k(
            lax.dot_general(q, keys, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32), k
        )
    )
    return lambda: jax.block_until_ready(search(q, keys))


def torch_chunked_topk(q_np: np.ndarray, keys_np: np.ndarray, k: int, dtype: str, chunk_bytes: int):
    import torch

    device = "cuda" if jax.default_backend() == "gpu" and torch.cuda.is_available() else "cpu"
    torch_dtype = getattr(torch, dtype)
    q = torch.from_numpy(q_np).to(device, torch_dtype)
    keys = torch.from_numpy(keys_np).to(device, torch_dtype)
    chunk = max(1, chunk_bytes // (4 * keys.shape[0]))

    def search():
        values, indices = [], []
        with torch.no_grad():
            for start in range(0, q.shape[0], chunk):
                v, i = torch.topk((q[start : start + chunk] @ keys.T).float(), k, dim=1)
                values.append(v)
                indices.append(i)
        if device == "cuda":
            torch.cuda.synchronize()
        return torch.cat(values).cpu().numpy(), torch.cat(indices).cpu().numpy()

    return search, f"torch {torch.__version__} {device}, {chunk} queries per chunk"


def faiss_flat_ip(q_np: np.ndarray, keys_np: np.ndarray, k: int):
    import faiss

    index = faiss.IndexFlatIP(keys_np.shape[1])
    index.add(keys_np)
    return lambda: index.search(
        q_np, k
    ), f"faiss {faiss.__version__} IndexFlatIP, {faiss.omp_get_max_threads()} threads"


def run_shape(n: int, m: int, d: int, k: int, dtype: str, repeats: int, rate: float, backend: str) -> list[tuple]:
    """Every path on the same numpy data, in one process (the CPU table)."""
    rng = np.random.default_rng(0)
    q_np, keys_np = unit_rows(rng, n, d), unit_rows(rng, m, d)
    q, keys = jnp.asarray(q_np, dtype), jnp.asarray(keys_np, dtype)
    flops = 2 * n * m * d
    rows = []
    reference = None

    def record(name, note, fn):
        nonlocal reference
        seconds, (values, indices) = best_time(fn, repeats)
        top1 = np.asarray(indices)[:, 0]
        if reference is None:
            reference = top1
        rows.append((name, seconds, flops / seconds / rate, float(np.mean(top1 == reference)), note))

    if backend == "cpu":
        rows.append(("emjax pallas kernel", None, None, None, "not timed: CPU runs it in interpret mode only"))
    else:
        record("emjax pallas kernel", f"fused kernel on {backend}", emjax_search("pallas", q, keys, k))
    record("emjax xla path", "blocked scan + lax.top_k merge", emjax_search("xla", q, keys, k))
    if n * m * 4 <= FULL_MATRIX_BYTES[backend]:
        record("matmul + lax.top_k", f"full {n}x{m} fp32 matrix", full_matmul_topk(q, keys, k))
    else:
        rows.append(("matmul + lax.top_k", None, None, None, f"skipped: {n * m * 4 / 2**30:.0f} GiB matrix"))
    if missing_module("torch"):
        rows.append(("torch matmul + topk", None, None, None, "skipped: torch is not installed"))
    else:
        fn, note = torch_chunked_topk(q_np, keys_np, k, dtype, chunk_bytes=1 << 30)
        record("torch matmul + topk", note, fn)
    if backend == "cpu" and not missing_module("faiss"):
        fn, note = faiss_flat_ip(q_np, keys_np, k)
        record("faiss IndexFlatIP", note, fn)
    return rows


def run_emjax_side(n, m, d, k, dtype, repeats, rate, backend, sweep: bool) -> list[tuple]:
    """emjax's paths on device-drawn data (gpu.sh's emjax process): a row is emitted as soon as it is timed."""
    q = normalize_rows(jax.random.normal(jax.random.key(0), (n, d), jnp.float32)).astype(dtype)
    keys = normalize_rows(jax.random.normal(jax.random.key(1), (m, d), jnp.float32)).astype(dtype)
    flops = 2 * n * m * d
    rows, reference = [], None

    def record(name, note, fn):
        nonlocal reference
        try:
            seconds, (values, indices) = best_time(fn, repeats)
        except Exception as e:  # e.g. a sweep setting past the device's shared memory: report it, go on
            rows.append((name, None, None, None, f"failed: {type(e).__name__}: {str(e)[:200]}"))
            emit(bench="similarity", side="emjax", run=name, failed=f"{type(e).__name__}: {str(e)[:500]}")
            return
        top1 = np.asarray(indices)[:, 0]
        reference = top1 if reference is None else reference
        rows.append((name, seconds, flops / seconds / rate, float(np.mean(top1 == reference)), note))
        emit(bench="similarity", side="emjax", run=name, seconds=seconds, flops=flops, note=note)

    if backend != "cpu":
        record("emjax pallas kernel", f"fused kernel on {backend}, default blocks", emjax_search("pallas", q, keys, k))
    record("emjax xla path", "blocked scan + lax.top_k merge", emjax_search("xla", q, keys, k))
    if n * m * 4 <= FULL_MATRIX_BYTES[backend]:
        record("matmul + lax.top_k", f"full {n}x{m} fp32 matrix", full_matmul_topk(q, keys, k))
    if sweep and backend != "cpu":
        ids = jnp.arange(m, dtype=jnp.int32)
        for setting in SWEEP:
            search = jax.jit(lambda q, keys, s=setting: topk_pallas(q, keys, ids, k, **s))
            name = "emjax pallas " + ", ".join(f"{key}={value}" for key, value in setting.items())
            run = functools.partial(lambda f: jax.block_until_ready(f(q, keys)), search)
            record(name, "kernel only (rows already unit)", run)
    return rows


def run_peer_side(n, m, d, k, dtype) -> None:
    """torch matmul + topk on device-drawn unit rows, in a process of its own (gpu.sh)."""
    import torch

    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch_dtype = getattr(torch, dtype)
    generator = torch.Generator(device=device).manual_seed(0)
    q = torch.nn.functional.normalize(torch.randn(n, d, device=device, generator=generator), dim=1).to(torch_dtype)
    keys = torch.nn.functional.normalize(torch.randn(m, d, device=device, generator=generator), dim=1).to(torch_dtype)
    chunk = max(1, (1 << 30) // (4 * m))

    def search():
        with torch.no_grad():
            for start in range(0, n, chunk):
                torch.topk((q[start : start + chunk] @ keys.T).float(), k, dim=1)
        if device == "cuda":
            torch.cuda.synchronize()
        return None, np.zeros((1, 1))

    seconds, _ = best_time(search, 3)
    note = f"torch {torch.__version__} {device}, {chunk} queries per chunk"
    emit(bench="similarity", side="peer", run="torch matmul + topk", seconds=seconds, flops=2 * n * m * d, note=note)
    print(f"torch matmul + topk: {seconds:.4f} s ({note})")


def print_rows(rows) -> None:
    print(f"{'method':<44} {'time (s)':>9} {'matmul %':>9} {'top-1 agree':>12}  notes")
    for name, seconds, fraction, agree, note in rows:
        if seconds is None:
            print(f"{name:<44} {'-':>9} {'-':>9} {'-':>12}  {note}")
        else:
            print(f"{name:<44} {seconds:>9.4f} {100 * fraction:>8.1f}% {100 * agree:>11.1f}%  {note}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--preset", choices=sorted(PRESETS), default="cpu")
    parser.add_argument("--sweep", action="store_true", help="also time the kernel with the SWEEP settings (GPU)")
    add_side_argument(parser)
    args = parser.parse_args()
    preset = PRESETS[args.preset]
    dtype, k, repeats = preset["dtype"], preset["k"], preset["repeats"]
    if args.side == "peer":
        missing = missing_module("torch")
        for n, m, d in preset["shapes"]:
            if missing:
                skip_peer("similarity", args.preset, missing)
            else:
                run_peer_side(n, m, d, k, dtype)
        return
    backend = jax.default_backend()
    print(f"device: {jax.devices()[0].device_kind} ({backend}), {os.cpu_count()} CPU cores, jax {jax.__version__}")
    for n, m, d in preset["shapes"]:
        rate = matmul_rate(d, dtype, repeats)
        emit(bench="similarity", side="emjax", run="matmul rate", flops_per_s=rate)
        print(f"\nn={n} queries x m={m} keys x d={d}, k={k}, {dtype}; measured matmul rate {rate / 1e12:.3f} TFLOP/s")
        if args.side == "emjax":
            print_rows(run_emjax_side(n, m, d, k, dtype, repeats, rate, backend, args.sweep))
        else:
            print_rows(run_shape(n, m, d, k, dtype, repeats, rate, backend))


if __name__ == "__main__":
    main()
