"""Exact top-k similarity search: emjax vs the usual baselines, same machine, one run.

    python benchmarks/similarity.py --preset=cpu        # CPU, fp32, sizes that finish in ~2 minutes
    python benchmarks/similarity.py --preset=gpu-131k   # GPU, bf16, 131072 x 131072 x 2304, k=32
    python benchmarks/similarity.py --preset=gpu-1m     # GPU, bf16, 1M queries x 131072 keys x 2304, k=32

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
"""

from __future__ import annotations

import argparse
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from emjax.kernels import similarity_topk

PRESETS = {
    "cpu": dict(shapes=[(8192, 65536, 256), (2048, 32768, 2304)], k=32, dtype="float32", repeats=2),
    "gpu-131k": dict(shapes=[(131072, 131072, 2304)], k=32, dtype="bfloat16", repeats=3),
    "gpu-1m": dict(shapes=[(1 << 20, 131072, 2304)], k=32, dtype="bfloat16", repeats=1),
}
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
    fn, note = torch_chunked_topk(q_np, keys_np, k, dtype, chunk_bytes=1 << 30)
    record("torch matmul + topk", note, fn)
    if backend == "cpu":
        fn, note = faiss_flat_ip(q_np, keys_np, k)
        record("faiss IndexFlatIP", note, fn)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--preset", choices=sorted(PRESETS), default="cpu")
    args = parser.parse_args()
    preset = PRESETS[args.preset]
    backend = jax.default_backend()
    dtype, k, repeats = preset["dtype"], preset["k"], preset["repeats"]
    print(f"device: {jax.devices()[0].device_kind} ({backend}), {os.cpu_count()} CPU cores, jax {jax.__version__}")
    for n, m, d in preset["shapes"]:
        rate = matmul_rate(d, dtype, repeats)
        print(f"\nn={n} queries x m={m} keys x d={d}, k={k}, {dtype}; measured matmul rate {rate / 1e12:.3f} TFLOP/s")
        print(f"{'method':<22} {'time (s)':>9} {'matmul %':>9} {'top-1 agree':>12}  notes")
        for name, seconds, fraction, agree, note in run_shape(n, m, d, k, dtype, repeats, rate, backend):
            if seconds is None:
                print(f"{name:<22} {'-':>9} {'-':>9} {'-':>12}  {note}")
            else:
                print(f"{name:<22} {seconds:>9.3f} {100 * fraction:>8.1f}% {100 * agree:>11.1f}%  {note}")


if __name__ == "__main__":
    main()
