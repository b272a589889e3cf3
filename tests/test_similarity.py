"""Exact top-k similarity search against a numpy brute-force oracle (topk_oracle).

The Pallas kernel runs interpreted here, in both of its forms: the GPU's (a
loop over key blocks in each program) and the TPU's (a sequential key grid
axis). What only a device can show is in test_accelerator.py.
"""

import functools
import itertools

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from jax import export

from emjax.distributed import make_mesh
from emjax.kernels import similarity_score, similarity_topk, similarity_topk_sets
from emjax.kernels.similarity_pallas import topk_pallas
from topk_oracle import TOLERANCE, assert_matches, integer_pair, oracle, random_pair

# Small blocks so that test shapes span several query and key blocks, with remainders.
XLA_BLOCKS = dict(block_queries=16, block_keys=32)
PALLAS_BLOCKS = dict(block_queries=8, block_keys=16)


@pytest.mark.parametrize("k", [1, 7, 32, 128])
@pytest.mark.parametrize("dtype", [np.float32, ml_dtypes.bfloat16])
def test_xla_path_matches_brute_force(k, dtype):
    rng = np.random.default_rng(k)
    q, kk = random_pair(rng, 53, 211, 40, dtype)  # neither a multiple of the block sizes
    result = similarity_topk(q, kk, k, method="xla", **XLA_BLOCKS)
    assert_matches(result, oracle(q, kk), k, TOLERANCE[dtype])


@pytest.mark.parametrize("dtype", [np.float32, ml_dtypes.bfloat16])
def test_pallas_kernel_matches_brute_force(dtype):
    rng = np.random.default_rng(1)
    q, kk = random_pair(rng, 19, 70, 24, dtype)
    result = similarity_topk(q, kk, 5, method="pallas", interpret=True, **PALLAS_BLOCKS)
    assert_matches(result, oracle(q, kk), 5, TOLERANCE[dtype])


@pytest.mark.parametrize("form", ["gpu", "tpu"])
@pytest.mark.parametrize("key_splits", [1, 3, 9])  # 9 > the 5 key blocks: capped
def test_pallas_kernel_with_key_splits_and_depth_blocks_equals_xla_path(form, key_splits):
    rng = np.random.default_rng(2)
    q, kk = integer_pair(rng, 21, 75, 20)
    ids = jnp.arange(75, dtype=jnp.int32)
    kernel = topk_pallas(
        q, kk, ids, 9, block_queries=8, block_keys=16, block_depth=8, key_splits=key_splits, interpret=True,
        platform=form,
    )  # fmt: skip
    xla = similarity_topk(q, kk, 9, normalize=False, method="xla", **XLA_BLOCKS)
    np.testing.assert_array_equal(np.asarray(kernel[0]), np.asarray(xla[0]))
    np.testing.assert_array_equal(np.asarray(kernel[1]), np.asarray(xla[1]))
    sims, order, _ = oracle(q, kk, normalize=False)
    np.testing.assert_array_equal(np.asarray(kernel[1]), order[:, :9])


@pytest.mark.parametrize("method", ["xla", "pallas"])
def test_ties_go_to_the_lower_key_index(method):
    """The contract covers bitwise-equal scores only: duplicate keys score the same bits, lower index first.

    Distinct keys whose cosines are mathematically equal (e.g. both orthogonal to
    the query) round differently on different CPUs, so their order is not asserted.
    """
    rng = np.random.default_rng(3)
    base = rng.integers(-2, 3, (12, 8)).astype(np.float32)
    keys = np.concatenate([base, base, base[:5]])  # every key duplicated, some three times
    first_copy = np.arange(len(keys)) % len(base)  # the lowest index holding the same key
    queries = rng.integers(-2, 3, (10, 8)).astype(np.float32)
    blocks = PALLAS_BLOCKS if method == "pallas" else XLA_BLOCKS
    for normalize in (False, True):
        values, indices = (
            np.asarray(x) for x in similarity_topk(queries, keys, 20, normalize=normalize, method=method, **blocks)
        )
        sims, order, _ = oracle(queries, keys, normalize=normalize)
        np.testing.assert_allclose(values, sims[:, :20], atol=1e-6)
        assert (np.diff(values, axis=1) <= 0).all()
        # Wherever two returned scores are bitwise equal, the lower key index comes first.
        equal = values[:, 1:] == values[:, :-1]
        assert (indices[:, 1:][equal] > indices[:, :-1][equal]).all()
        for row in range(len(queries)):
            position = {int(i): j for j, i in enumerate(indices[row])}
            for j, key in enumerate(indices[row]):
                # A duplicate scores the same bits, and every lower copy of it was returned before it.
                for copy in range(first_copy[key], key, len(base)):
                    assert copy in position and position[copy] < j, (row, key, copy)
                    assert values[row, position[copy]] == values[row, j]
        if not normalize:  # integer dot products are exact: every tie is real, so the whole order is fixed
            np.testing.assert_array_equal(indices, order[:, :20])


@pytest.mark.parametrize("method", ["xla", "pallas"])
def test_zero_vectors_have_cosine_zero(method):
    rng = np.random.default_rng(4)
    queries, keys = random_pair(rng, 6, 30, 8)
    queries[2] = 0
    keys[[4, 17]] = 0
    blocks = PALLAS_BLOCKS if method == "pallas" else XLA_BLOCKS
    values, indices = similarity_topk(queries, keys, 30, method=method, **blocks)
    values, indices = np.asarray(values), np.asarray(indices)
    assert np.isfinite(values).all()
    np.testing.assert_array_equal(values[2], 0)
    np.testing.assert_array_equal(indices[2], np.arange(30))  # all equal: index order
    for row in (0, 1, 3, 4, 5):
        np.testing.assert_array_equal(values[row][np.isin(indices[row], [4, 17])], 0)
    sims, order, _ = oracle(queries, keys)
    np.testing.assert_allclose(values, sims[:, :30], atol=1e-5)


def test_dot_products_without_normalisation():
    rng = np.random.default_rng(5)
    q, kk = random_pair(rng, 30, 90, 16)
    assert_matches(similarity_topk(q, kk, 10, normalize=False), oracle(q, kk, normalize=False), 10, 1e-4)


def test_k_equal_to_m_returns_every_key():
    rng = np.random.default_rng(6)
    q, kk = random_pair(rng, 9, 33, 12)
    assert_matches(similarity_topk(q, kk, 33, method="xla", **XLA_BLOCKS), oracle(q, kk), 33, 1e-5)


@pytest.mark.parametrize(
    "queries, keys, k, match",
    [
        (np.ones((4, 8)), np.ones((5, 8)), 6, r"k=6 exceeds the number of keys m=5"),
        (np.ones((4, 8)), np.ones((5, 8)), 0, r"k must be a positive integer"),
        (np.ones((4, 8)), np.ones((5, 7)), 2, r"different feature sizes \(8 != 7\)"),
        (np.ones((4,)), np.ones((5, 8)), 2, r"must be 2-D"),
    ],
)
def test_invalid_arguments_are_rejected_clearly(queries, keys, k, match):
    with pytest.raises(ValueError, match=match):
        similarity_topk(queries.astype(np.float32), keys.astype(np.float32), k)


@pytest.mark.parametrize("method", ["xla", "pallas"])
@pytest.mark.parametrize(
    "axes", [dict(data=8), dict(data=1, tensor=8), dict(data=2, tensor=4), dict(data=2, fsdp=2, tensor=2)]
)
def test_sharded_over_eight_devices_equals_single_device(axes, method):
    assert jax.device_count() == 8
    rng = np.random.default_rng(7)
    q, kk = integer_pair(rng, 29, 83, 16)  # neither divides the shard counts
    blocks = PALLAS_BLOCKS if method == "pallas" else XLA_BLOCKS
    mesh = make_mesh(**axes)
    # Integer dot products are exact, so ties are real and every path must agree bit for bit.
    single = similarity_topk(q, kk, 12, normalize=False, method=method, **blocks)
    sharded = similarity_topk(q, kk, 12, normalize=False, method=method, mesh=mesh, **blocks)
    for got, want in zip(sharded, single):
        np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
    sims, order, _ = oracle(q, kk, normalize=False)
    np.testing.assert_array_equal(np.asarray(sharded[1]), order[:, :12])
    np.testing.assert_array_equal(np.asarray(sharded[0]), sims[:, :12])


def test_sharded_with_more_key_shards_than_k():
    rng = np.random.default_rng(8)
    q, kk = random_pair(rng, 16, 20, 8)  # 8 key shards of 3 rows each (4 padded), k above a shard's size
    result = similarity_topk(q, kk, 10, method="xla", mesh=make_mesh(data=1, tensor=8), **XLA_BLOCKS)
    assert_matches(result, oracle(q, kk), 10, 1e-5)


def test_several_query_sets_in_one_call():
    rng = np.random.default_rng(9)
    keys = rng.standard_normal((120, 16)).astype(np.float32)
    sets = [rng.standard_normal((n, 16)).astype(np.float32) for n in (5, 17, 1)]
    results = similarity_topk_sets(sets, keys, 4, method="xla", **XLA_BLOCKS)
    assert len(results) == 3
    for q, result in zip(sets, results):
        assert_matches(result, oracle(q, keys), 4, 1e-5)


@pytest.mark.parametrize("k", [1, 5])
def test_score_is_max_or_top_k_mean_similarity(k):
    rng = np.random.default_rng(10)
    tokens = rng.standard_normal((3, 11, 16)).astype(np.float32)  # [batch, seq, d]
    toxic = rng.standard_normal((40, 16)).astype(np.float32)
    scores = similarity_score(tokens, toxic, k=k, method="xla", **XLA_BLOCKS)
    sims, _, _ = oracle(tokens.reshape(-1, 16), toxic)
    assert scores.shape == (3, 11)
    np.testing.assert_allclose(np.asarray(scores), sims[:, :k].mean(axis=1).reshape(3, 11), atol=1e-5)


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float32])
@pytest.mark.parametrize("shape", [(256, 512, 256, 32), (37, 1003, 24, 1), (5, 4099, 64, 64), (300, 261, 32, 128)])
@pytest.mark.parametrize("platform", ["tpu", "cuda"])
def test_kernel_lowers_for_accelerators(platform, shape, dtype):
    """The kernel body, with its default blocks for the platform, uses only ops and shapes the TPU
    (Mosaic) and GPU (Triton) lowerings accept.

    This lowers on the CPU host; it does not compile or run on the device.
    """
    n, m, d, k = shape
    q = jax.ShapeDtypeStruct((n, d), dtype)
    keys = jax.ShapeDtypeStruct((m, d), dtype)
    ids = jax.ShapeDtypeStruct((m,), jnp.int32)

    def search(q, keys, ids):
        return topk_pallas(q, keys, ids, k, platform=platform)

    # The Triton call carries no serialisation guarantee; lowering is all this checks.
    unsafe = [export.DisabledSafetyCheck.custom_call("__gpu$xla.gpu.triton")]
    exported = export.export(jax.jit(search), platforms=[platform], disabled_checks=unsafe)(q, keys, ids)
    assert exported.out_avals[0].shape == (n, k)


def _kernel_call(platform):
    """The grid mapping of the kernel's pallas_call when traced for `platform` (nothing is compiled)."""
    q = jax.ShapeDtypeStruct((40, 32), jnp.bfloat16)
    keys = jax.ShapeDtypeStruct((200, 32), jnp.bfloat16)
    ids = jax.ShapeDtypeStruct((200,), jnp.int32)
    search = functools.partial(topk_pallas, k=4, block_queries=16, block_keys=16, key_splits=2, platform=platform)
    found = []

    def visit(jaxpr):
        for eqn in jaxpr.eqns:
            if eqn.primitive.name == "pallas_call":
                found.append(eqn.params["grid_mapping"])
            for inner in jax.extend.core.jaxprs_in_params(eqn.params):
                visit(inner)

    visit(jax.make_jaxpr(search)(q, keys, ids).jaxpr)
    (grid_mapping,) = found
    return grid_mapping


def _output_writers(grid_mapping):
    """{output block index: grid points whose program writes it}, for each output."""
    writers = []
    for mapping in grid_mapping.block_mappings[grid_mapping.num_inputs :]:
        index_map = mapping.index_map_jaxpr
        blocks = {}
        for point in itertools.product(*map(range, grid_mapping.grid)):
            block = tuple(int(b) for b in jax.core.eval_jaxpr(index_map.jaxpr, index_map.consts, *point))
            blocks.setdefault(block, []).append(point)
        writers.append(blocks)
    return writers


def test_gpu_kernel_writes_each_output_block_from_one_program():
    """GPU programs run concurrently in no set order: no two may share an output block (the first GPU
    kernel kept a running top-k in a block revisited along a key grid axis, and raced)."""
    grid_mapping = _kernel_call("gpu")
    assert len(grid_mapping.grid) == 2  # (query blocks, key splits): the key blocks are a loop inside
    for blocks in _output_writers(grid_mapping):
        assert all(len(points) == 1 for points in blocks.values()), blocks


def test_tpu_kernel_revisits_an_output_block_only_along_its_sequential_axis():
    grid_mapping = _kernel_call("tpu")
    assert len(grid_mapping.grid) == 3  # (query blocks, key splits, key blocks: "arbitrary", sequential)
    for blocks in _output_writers(grid_mapping):
        for points in blocks.values():
            assert len({point[:2] for point in points}) == 1, points


def test_auto_uses_the_kernel_only_on_validated_backends(monkeypatch):
    from emjax.kernels import similarity

    assert similarity.resolve_method("auto", "gpu") == "xla"  # until the accelerator suite has passed there
    monkeypatch.setitem(similarity.VALIDATED_KERNEL_BACKENDS, "gpu", "a passing run")
    assert similarity.resolve_method("auto", "gpu") == "pallas"
    assert similarity.resolve_method("auto", "tpu") == "xla"
    assert similarity.resolve_method("xla", "gpu") == "xla"
    with pytest.raises(ValueError, match="method must be one of"):
        similarity.resolve_method("triton", "gpu")
