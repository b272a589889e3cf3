"""Fused similarity top-k as a Pallas kernel: similarities never leave the chip.

Each program owns one block of query rows and one split of the keys. It
computes the fp32 tile queries[i] . keys[j]^T for one key block at a time and
merges it into a running top-k for its rows, then moves to the next key block
of its split. Splits are merged afterwards in XLA by (value desc, key id asc).

Why the key blocks are walked in a loop inside the program (GPU): the running
top-k is only exact if the key blocks of a split are merged one after another,
in ascending key order (a tie keeps the lower key, which must already be
kept). Pallas' Triton lowering runs grid programs concurrently and in no
guaranteed order, so a kernel that keeps the running set in an output block
revisited along a key grid axis (the TPU pattern, where the grid is a
sequential loop and an "arbitrary" axis keeps its output resident) reads and
writes that block from several programs at once on a GPU. That was the wrong
neighbours the first GPU run found. Here the key loop is a `fori_loop` inside
one program, as in Pallas' GPU attention kernels, and every output block is
written by exactly one program, once. On TPU the grid form is kept (its key
axis is declared "arbitrary", i.e. sequential), since a TPU program cannot
hold a whole key split in VMEM; the selection step is shared.

Selection: no Pallas backend lowers sort or top_k, so the running set is kept
unsorted ([rows, lanes], lanes = next power of two >= k) and a tile is merged
by repeated extraction: while some row's best unextracted tile value beats
its worst kept value, take each row's next tile candidate in (value desc,
column asc) order and let it replace that row's worst kept entry (lowest
value, and among equals the highest key position). The tile itself is never
rewritten (the extraction point is carried per row), so it stays in
registers. A tile that cannot improve any row costs one row max; after the
first few tiles almost none can, so selection costs far less than the matmul.
Kernel outputs are key positions; key ids are gathered from them afterwards.

Precision: fp32 inputs are multiplied at HIGHEST precision (IEEE fp32 on
GPU, not TF32; see emjax.precision for the one setting that opts out);
bf16 inputs use bf16 products with fp32 accumulation, as the XLA path does.

Backend choice for NVIDIA GPUs: Pallas' Triton backend, selected with Triton
compiler parameters. The JAX documentation deprecates that backend as of jax
0.11.0 ("will be removed in a future version"; Mosaic GPU is the maintained
one), and we still use it because: (1) Mosaic GPU kernels are written at
warpgroup level (`plgpu.kernel`, WGMMA operands staged in shared memory by
hand; `pl.pallas_call` on Mosaic GPU is itself deprecated), and the
selection step's row reductions, masks and data-dependent loop would have
to be laid out by hand in WGMMA register layouts: a different kernel, not a
port, and one that cannot be run or interpreted faithfully without a GPU;
(2) its API changed between the jax versions we support (0.10: lane
semantics by default, WGMMA-only, i.e. Hopper and newer; 0.11: warpgroup
semantics by default, Ampere MMA added); (3) this body lowers to Triton IR
from a CPU host (tests/test_similarity.py), that IR compiles for sm_90 to
WGMMA with a 3-stage async-copy pipeline in 96 KiB of shared memory and no
register spills at the default blocks (checked offline with Triton 3.9), the
previous kernel's selection ops compiled on an H200 under jax 0.11.2, and
Triton serves every NVIDIA generation since Ampere. The
kernel is used by method="auto" only on backends listed in
similarity.VALIDATED_KERNEL_BACKENDS, i.e. after the accelerator suite has
passed on that hardware; a Mosaic GPU kernel is the replacement to write when
a GPU is at hand to validate it, before jax drops Triton. Where the Triton
backend is gone, method="pallas" on a GPU raises and "auto" uses XLA.

On CPU the kernel runs with interpret=True only (tests); CPU users get the
XLA path.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from emjax.kernels.topk_merge import PAD_ID, merge_candidates, pad_rows
from emjax.precision import matmul_precision

EMPTY = -1  # key position of a running-set slot that holds nothing yet


@dataclasses.dataclass(frozen=True)
class Blocks:
    """Block sizes and launch parameters of the kernel on one platform."""

    queries: int
    keys: int
    depth: int
    num_warps: int | None = None  # Triton only
    num_stages: int | None = None  # Triton only


def default_blocks(platform: str, dtype) -> Blocks:
    """Block sizes for a platform ("gpu", "tpu", or anything else for the interpreter).

    GPU: 128 x 128 output tiles (the accumulator and the running set stay in
    registers with 8 warps) and a depth step of 64 bf16 (32 fp32) columns, so
    3 pipeline stages of both operands take 96 KiB of shared memory, within
    every NVIDIA GPU since Ampere. TPU: 128-multiples, as Mosaic requires.
    """
    if platform in ("gpu", "cuda", "rocm"):
        wide = jnp.dtype(dtype).itemsize >= 4
        return Blocks(queries=128, keys=128, depth=32 if wide else 64, num_warps=8, num_stages=3)
    return Blocks(queries=128, keys=128, depth=128)


def _merge_tile(tile, key_start, values, kept):
    """Merge one similarity tile [q, b] (masked keys at -inf) into the running set.

    Column c of the tile is the key at position key_start + c, above every
    kept position; values, kept [q, lanes]: the running set (kept = key
    positions, EMPTY where unused). Returns the new (values, kept).
    """
    block_q, block_k = tile.shape
    lanes = values.shape[1]
    column = lax.broadcasted_iota(jnp.int32, (block_q, block_k), 1)
    lane = lax.broadcasted_iota(jnp.int32, (block_q, lanes), 1)

    def next_candidate(last_value, last_column):
        # The best tile entry after (last_value, last_column) in (value desc, column asc) order.
        after = (tile < last_value) | ((tile == last_value) & (column > last_column))
        best = jnp.max(jnp.where(after, tile, -jnp.inf), axis=1, keepdims=True)
        best_column = jnp.min(jnp.where(after & (tile == best), column, block_k), axis=1, keepdims=True)
        return best, best_column

    def worst_kept(values):
        return jnp.min(values, axis=1, keepdims=True)

    def some_row_improves(state):
        best, _, values, _ = state
        # A max over int32 rather than jnp.any: Triton has no lowering for reduce_or.
        return jnp.max((best > worst_kept(values)).astype(jnp.int32)) > 0

    def take(state):
        best, best_column, values, kept = state
        # Evict the worst kept entry: lowest value, and among those the highest key position.
        worst = worst_kept(values)
        is_worst = values == worst
        worst_position = jnp.max(jnp.where(is_worst, kept, EMPTY - 1), axis=1, keepdims=True)
        slot = jnp.min(jnp.where(is_worst & (kept == worst_position), lane, lanes), axis=1, keepdims=True)
        # Strictly greater: a candidate's position exceeds every kept one, so on a tie the kept entry stays.
        replace = (lane == slot) & (best > worst)
        values = jnp.where(replace, best, values)
        kept = jnp.where(replace, key_start + best_column, kept)
        return (*next_candidate(best, best_column), values, kept)

    start = jnp.full((block_q, 1), jnp.inf, jnp.float32), jnp.full((block_q, 1), -1, jnp.int32)
    _, _, values, kept = lax.while_loop(some_row_improves, take, (*next_candidate(*start), values, kept))
    return values, kept


def _similarity_tile(q_ref, k_ref, key_start, block_keys: int, block_depth: int):
    """queries block . keys[key_start : key_start + block_keys]^T in fp32, block_depth columns at a time."""
    block_q, depth = q_ref.shape
    precision = matmul_precision(q_ref.dtype, k_ref.dtype)
    rows = pl.ds(key_start, block_keys)

    def accumulate(c, acc):
        cols = pl.ds(pl.multiple_of(c * block_depth, block_depth), block_depth)
        return acc + lax.dot_general(
            q_ref[:, cols],
            k_ref[rows, cols],
            (((1,), (1,)), ((), ())),
            precision=precision,
            preferred_element_type=jnp.float32,
        )

    return lax.fori_loop(0, depth // block_depth, accumulate, jnp.zeros((block_q, block_keys), jnp.float32))


def _masked_tile(ids_ref, q_ref, k_ref, start, block_keys: int, block_depth: int):
    """The tile of the keys at `start` within the refs, with padded keys (id PAD_ID) at -inf."""
    tile = _similarity_tile(q_ref, k_ref, start, block_keys, block_depth)
    ids = ids_ref[:, pl.ds(start, block_keys)]  # [1, block_keys]
    return jnp.where(ids >= 0, tile, -jnp.inf)


def _empty_set(shape):
    return jnp.full(shape, -jnp.inf, jnp.float32), jnp.full(shape, EMPTY, jnp.int32)


def _looping_kernel(ids_ref, q_ref, k_ref, values_ref, kept_ref, *, block_keys, block_depth, blocks_per_split):
    """Program (split, query block): every key block of the split, in ascending order, in one loop."""
    first = pl.program_id(0) * blocks_per_split

    def one_block(j, running):
        start = pl.multiple_of((first + j) * block_keys, block_keys)
        tile = _masked_tile(ids_ref, q_ref, k_ref, start, block_keys, block_depth)
        return _merge_tile(tile, start, *running)

    values, kept = lax.fori_loop(0, blocks_per_split, one_block, _empty_set(values_ref.shape))
    values_ref[...] = values
    kept_ref[...] = kept


def _grid_kernel(ids_ref, q_ref, k_ref, values_ref, kept_ref, *, block_keys, block_depth, blocks_per_split):
    """Program (query block, split, key block): one tile, merged into the output block that stays
    resident while the sequential ("arbitrary") key axis advances. TPU only: it relies on that order."""

    @pl.when(pl.program_id(2) == 0)
    def _start_split():
        values_ref[...], kept_ref[...] = _empty_set(values_ref.shape)

    start = (pl.program_id(1) * blocks_per_split + pl.program_id(2)) * block_keys
    tile = _masked_tile(ids_ref, q_ref, k_ref, 0, block_keys, block_depth)  # the refs hold this block only
    values_ref[...], kept_ref[...] = _merge_tile(tile, start, values_ref[...], kept_ref[...])


def _compiler_params(platform: str, blocks: Blocks):
    if platform == "tpu":
        from jax.experimental.pallas import tpu as pltpu

        return pltpu.CompilerParams(dimension_semantics=("parallel", "parallel", "arbitrary"))
    if platform in ("gpu", "cuda", "rocm"):
        try:
            from jax.experimental.pallas import triton as pltriton
        except ImportError as e:  # a jax without the (deprecated) Triton backend
            raise NotImplementedError(
                f"jax {jax.__version__} has no Pallas Triton backend, which this kernel needs on GPUs; "
                'use similarity_topk(..., method="xla")'
            ) from e
        return pltriton.CompilerParams(num_warps=blocks.num_warps, num_stages=blocks.num_stages)
    return None


# Budget for the query blocks that one wave of GPU programs holds: half the 50 MiB L2 of an H100/H200.
L2_BUDGET = 24 << 20


def _gpu_cores() -> int:
    """The GPU's SM count (132 on an H100/H200, the default when lowering from a host without one)."""
    device = jax.devices()[0]
    return (int(getattr(device, "core_count", 0) or 0) if device.platform == "gpu" else 0) or 132


def default_key_splits(platform: str, query_blocks: int, key_blocks: int, query_block_bytes: int) -> int:
    """Key splits for the GPU's loop form; 1 elsewhere.

    Programs are launched split-fastest, so those running at once share
    query blocks. Enough splits that (a) every SM gets a program when there
    are few query blocks, and (b) the query blocks of one wave of programs
    (one per SM), re-read for every key block, stay in L2 (L2_BUDGET), not
    HBM: for 16k queries of d=2304 in bf16, 4 splits. Each split keeps at
    least 8 key blocks, since the selection restarts in every split.
    """
    if platform not in ("gpu", "cuda", "rocm"):
        return 1
    cores = _gpu_cores()
    fill = round(cores / query_blocks)
    cached = -(-cores * query_block_bytes // L2_BUDGET)
    return max(1, min(max(fill, cached), key_blocks // 8))


def _power_of_two_at_most(limit: int, size: int, floor: int = 16) -> int:
    """The block for `size` rows: `limit`, or the next power of two >= size (>= floor) when smaller."""
    return min(limit, max(floor, pl.next_power_of_2(size)))


@functools.partial(
    jax.jit,
    static_argnames=(
        "k", "block_queries", "block_keys", "block_depth", "key_splits", "interpret", "platform",
        "num_warps", "num_stages",
    ),
)  # fmt: skip
def topk_pallas(
    queries: jnp.ndarray,
    keys: jnp.ndarray,
    key_ids: jnp.ndarray,
    k: int,
    *,
    block_queries: int | None = None,
    block_keys: int | None = None,
    block_depth: int | None = None,
    key_splits: int | None = None,
    interpret: bool = False,
    platform: str | None = None,
    num_warps: int | None = None,
    num_stages: int | None = None,
) -> tuple[jnp.ndarray, jnp.ndarray]:
    """Same contract as similarity_xla.topk_blocked, computed by the fused kernel.

    platform ("gpu"/"cuda", "tpu"; default: this process's backend) picks the
    kernel form (a key loop per program, or the TPU's sequential grid), the
    default block sizes (default_blocks) and the compiler parameters, so a CPU
    host can lower the kernel for an accelerator. With interpret=True the
    kernel is emulated on the host in the form `platform` selects (the loop
    form by default). Block sizes must be powers of two (Triton) and, on TPU,
    multiples of 128 in the key and depth dimensions; smaller inputs shrink
    them to the next power of two (at least 16, Triton's smallest dot).
    Queries and keys are zero-padded to whole blocks (padded keys are masked
    by id, zero depth adds nothing). key_splits (default: default_key_splits)
    splits the keys into ranges searched independently, then merged.
    """
    n, d = queries.shape
    m = keys.shape[0]
    platform = platform or jax.default_backend()
    defaults = default_blocks(platform, queries.dtype)
    block_queries = _power_of_two_at_most(block_queries or defaults.queries, n)
    block_keys = _power_of_two_at_most(block_keys or defaults.keys, m)
    block_depth = _power_of_two_at_most(block_depth or defaults.depth, d)
    blocks = dataclasses.replace(
        defaults, num_warps=num_warps or defaults.num_warps, num_stages=num_stages or defaults.num_stages
    )
    for name, size in (("block_queries", block_queries), ("block_keys", block_keys), ("block_depth", block_depth)):
        if size & (size - 1):
            raise ValueError(f"{name} must be a positive power of two, got {size}")
    query_blocks = -(-n // block_queries)
    key_blocks = -(-m // block_keys)
    depth = -(-d // block_depth) * block_depth
    if key_splits is None:
        query_block_bytes = block_queries * depth * queries.dtype.itemsize
        key_splits = default_key_splits(platform, query_blocks, key_blocks, query_block_bytes)
    if key_splits <= 0:
        raise ValueError(f"key_splits must be positive, got {key_splits}")
    key_splits = min(key_splits, key_blocks)
    lanes = pl.next_power_of_2(k)  # the running set keeps >= k entries; extras only add candidates
    n_pad = query_blocks * block_queries
    blocks_per_split = -(-key_blocks // key_splits)
    m_pad = blocks_per_split * block_keys * key_splits

    q = jnp.pad(pad_rows(queries, n_pad), ((0, 0), (0, depth - d)))
    kk = jnp.pad(pad_rows(keys, m_pad), ((0, 0), (0, depth - d)))
    ids = jnp.pad(key_ids.astype(jnp.int32), (0, m_pad - m), constant_values=PAD_ID)

    sizes = dict(block_keys=block_keys, block_depth=block_depth, blocks_per_split=blocks_per_split)
    out_shape = [
        jax.ShapeDtypeStruct((key_splits, n_pad, lanes), jnp.float32),
        jax.ShapeDtypeStruct((key_splits, n_pad, lanes), jnp.int32),
    ]
    if platform == "tpu":

        def key_block(s, j):
            return s * blocks_per_split + j

        out_block = pl.BlockSpec((pl.squeezed, block_queries, lanes), lambda i, s, j: (s, i, 0))
        kernel = functools.partial(_grid_kernel, **sizes)
        grid = (query_blocks, key_splits, blocks_per_split)
        in_specs = [
            pl.BlockSpec((1, block_keys), lambda i, s, j: (0, key_block(s, j))),
            pl.BlockSpec((block_queries, depth), lambda i, s, j: (i, 0)),
            pl.BlockSpec((block_keys, depth), lambda i, s, j: (key_block(s, j), 0)),
        ]
    else:
        # Each program sees every key (it slices its split's blocks itself) and writes one output block.
        # The split is the first (fastest-launched) grid axis: see default_key_splits.
        out_block = pl.BlockSpec((pl.squeezed, block_queries, lanes), lambda s, i: (s, i, 0))
        kernel = functools.partial(_looping_kernel, **sizes)
        grid = (key_splits, query_blocks)
        in_specs = [
            pl.BlockSpec((1, m_pad), lambda s, i: (0, 0)),
            pl.BlockSpec((block_queries, depth), lambda s, i: (i, 0)),
            pl.BlockSpec((m_pad, depth), lambda s, i: (0, 0)),
        ]
    values, kept = pl.pallas_call(
        kernel,
        grid=grid,
        in_specs=in_specs,
        out_specs=[out_block, out_block],
        out_shape=out_shape,
        compiler_params=None if interpret else _compiler_params(platform, blocks),
        interpret=interpret,
    )(ids[None, :], q, kk)
    # [splits, n, lanes] key positions -> [n, splits * lanes] unordered candidates with their key ids -> top k.
    values = jnp.moveaxis(values[:, :n], 0, 1).reshape(n, key_splits * lanes)
    kept = jnp.moveaxis(kept[:, :n], 0, 1).reshape(n, key_splits * lanes)
    found = jnp.where(kept == EMPTY, PAD_ID, ids[jnp.maximum(kept, 0)])
    return merge_candidates(values, found, k)
