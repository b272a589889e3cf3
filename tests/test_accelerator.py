"""The accelerator suite: what must hold on the device the tests run on.

CPU-green is not accelerator-green: the first GPU run found a Pallas kernel
that was right in the CPU interpreter and wrong on the device, and fp32
matmuls silently run as TF32. Run this suite on every new kind of device:

    EMJAX_TEST_PLATFORM=gpu python -m pytest -q -m accelerator    # an NVIDIA GPU host
    EMJAX_TEST_PLATFORM=tpu python -m pytest -q -m accelerator    # a TPU host
    python -m pytest -q -m accelerator                            # here: 8 fake CPU devices, kernels interpreted

The computations run on that device; every oracle is independent of it and of
emjax: float64 numpy, or transformers / peft in fp32 on the host CPU. fp32
tolerances (1e-4 of the scale, 1e-5 for cosines) are far below what TF32 or a
single bf16 pass gives (~1e-3), so they fail if fp32 is not fp32. The last
tests lower every jitted step for TPU from whatever host this is, so a
lowering failure shows before anyone rents a slice.
"""

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from flax import nnx

import emjax.models
from emjax import distributed, lora, train
from emjax.config import LoRAConfig, TrainConfig
from emjax.data.chat import SFTRows
from emjax.generate import _decode, generate
from emjax.kernels import similarity_topk
from emjax.kernels.similarity_pallas import topk_pallas
from emjax.sae import JumpReLUSAE, TopKSAE
from hf_oracle import assert_close, hf_greedy, random_gemma2, random_gpt_oss, random_llama, reference
from topk_oracle import TOLERANCE, assert_matches, oracle

pytestmark = pytest.mark.accelerator

FAMILIES = {"gemma2": random_gemma2, "llama": random_llama, "gpt-oss": random_gpt_oss}
# (n, m, d, k): none a multiple of any block size; k from 1 to beyond a GPU block of keys.
AWKWARD = [(37, 1003, 24, 1), (129, 777, 40, 17), (5, 4099, 64, 64), (300, 261, 32, 128)]


def mesh_over_all_devices():
    """Every local device, split over data, fsdp and tensor where the count allows."""
    n = jax.local_device_count()
    axes = dict(data=2, fsdp=n // 4, tensor=2) if n % 4 == 0 else dict(data=n)
    return distributed.make_mesh(**axes, devices=jax.local_devices())


@pytest.fixture(scope="module", params=list(FAMILIES))
def family(request, tmp_path_factory):
    """(name, transformers model, checkpoint path) of a random tiny model of each family."""
    hf, path = FAMILIES[request.param](tmp_path_factory.mktemp(request.param))
    return request.param, hf, path


# ---------------------------------------------------------------------------- the similarity kernel


def _integer_search_inputs(n, m, d, seed):
    """Entries in {-2..2}, so every product and sum is exact in bf16 and fp32: ties are real ties.
    Key 1 duplicates key 0 and the last key duplicates a middle one, across key blocks."""
    rng = np.random.default_rng(seed)
    queries = rng.integers(-2, 3, (n, d)).astype(np.float32)
    keys = rng.integers(-2, 3, (m, d)).astype(np.float32)
    keys[1] = keys[0]
    keys[-1] = keys[m // 2]
    return queries, keys


@pytest.mark.parametrize("dtype", [np.float32, ml_dtypes.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("shape", AWKWARD, ids=lambda s: "x".join(map(str, s)))
def test_kernel_is_exact_on_awkward_shapes_with_ties(shape, dtype):
    n, m, d, k = shape
    queries, keys = _integer_search_inputs(n, m, d, seed=n)
    sims, order, _ = oracle(queries, keys, normalize=False)
    q, kk = jnp.asarray(queries, dtype), jnp.asarray(keys, dtype)
    kernel = similarity_topk(q, kk, k, normalize=False, method="pallas")
    xla = similarity_topk(q, kk, k, normalize=False, method="xla")
    for values, indices in (kernel, xla):
        np.testing.assert_array_equal(np.asarray(values), sims[:, :k])
        np.testing.assert_array_equal(np.asarray(indices), order[:, :k])  # ties: the lower key index first


@pytest.mark.parametrize("dtype", [np.float32, ml_dtypes.bfloat16], ids=["fp32", "bf16"])
def test_kernel_cosines_match_float64(dtype):
    """Random cosines within 1e-5 in fp32 (TF32 products would be ~1e-3 off) and bf16 rounding in bf16."""
    rng = np.random.default_rng(11)
    queries = rng.standard_normal((129, 64)).astype(dtype)
    keys = rng.standard_normal((777, 64)).astype(dtype)
    expected = oracle(queries, keys)
    assert_matches(similarity_topk(queries, keys, 17, method="pallas"), expected, 17, TOLERANCE[dtype])
    assert_matches(similarity_topk(queries, keys, 17, method="xla"), expected, 17, TOLERANCE[dtype])


def test_kernel_zero_rows_and_every_key():
    rng = np.random.default_rng(12)
    queries = rng.standard_normal((20, 32)).astype(np.float32)
    keys = rng.standard_normal((150, 32)).astype(np.float32)
    queries[3] = 0
    keys[[7, 140]] = 0
    values, indices = (np.asarray(x) for x in similarity_topk(queries, keys, 150, method="pallas"))
    np.testing.assert_array_equal(values[3], 0)
    np.testing.assert_array_equal(indices[3], np.arange(150))  # all equal: key order
    np.testing.assert_array_equal(np.sort(indices, axis=1), np.broadcast_to(np.arange(150), (20, 150)))
    sims, _, _ = oracle(queries, keys)
    np.testing.assert_allclose(values, sims, atol=1e-5)


def test_kernel_sharded_over_all_local_devices():
    queries, keys = _integer_search_inputs(61, 530, 48, seed=13)
    sims, order, _ = oracle(queries, keys, normalize=False)
    mesh = mesh_over_all_devices()
    for method in ("pallas", "xla"):
        values, indices = similarity_topk(queries, keys, 20, normalize=False, method=method, mesh=mesh)
        np.testing.assert_array_equal(np.asarray(values), sims[:, :20])
        np.testing.assert_array_equal(np.asarray(indices), order[:, :20])


# ---------------------------------------------------------------------------- models against transformers


def test_fp32_logits_match_transformers(family):
    _, hf, path = family
    ids = np.random.RandomState(1).randint(0, 90, (2, 13))
    ref_logits, ref_hidden = reference(hf, ids)
    model = emjax.models.load(path, dtype="float32")
    out = emjax.models.jit_forward(model, capture=(1,))(jnp.asarray(ids))
    assert_close(out.logits, ref_logits, rel=1e-4)
    assert_close(out.captured[1], ref_hidden[2], rel=1e-4)


def test_bf16_logits_within_bf16_rounding_of_fp32_transformers(family):
    """bf16 weights and activations (fp32 accumulation, norms and softmax): a few bf16 ulps of the scale."""
    _, hf, path = family
    ids = np.random.RandomState(2).randint(0, 90, (2, 13))
    ref_logits, _ = reference(hf, ids)
    out = emjax.models.jit_forward(emjax.models.load(path, dtype="bfloat16"))(jnp.asarray(ids))
    assert out.logits.dtype == jnp.float32
    assert_close(out.logits, ref_logits, rel=0.05)


def test_greedy_generate_equals_transformers(family):
    _, hf, path = family
    prompts = [[5, 17, 3], [9, 3, 44, 60, 7, 8, 21], [11, 12, 13, 14, 15, 16, 17, 18, 19, 20, 22]]
    ours = generate(emjax.models.load(path, dtype="float32"), prompts, max_new_tokens=8, temperature=0.0)
    assert ours == hf_greedy(hf, prompts, 8, eos=None)


def test_sharded_forward_over_all_local_devices_equals_transformers(tmp_path):
    hf, path = random_gemma2(tmp_path, vocab_size=96)
    ids = np.random.RandomState(3).randint(0, 96, (8, 10))
    mesh = mesh_over_all_devices()
    model = emjax.models.load(path, dtype="float32", mesh=mesh)
    batch = distributed.shard_batch({"ids": ids}, mesh)
    logits = emjax.models.jit_forward(model)(batch["ids"]).logits
    assert_close(logits, reference(hf, ids)[0], rel=1e-4)


# ---------------------------------------------------------------------------- LoRA and SAEs


def test_one_lora_step_matches_peft(tmp_path):
    """The loss before and after one AdamW step (clipped gradients) equals transformers + peft's on the CPU."""
    peft = pytest.importorskip("peft")
    torch = pytest.importorskip("torch")
    hf, path = random_llama(tmp_path)
    config = LoRAConfig(rank=4, alpha=8, rslora=False, targets=("q_proj", "v_proj", "o_proj", "down_proj"))
    model = lora.attach(emjax.models.load(path, dtype="float32"), config, seed=1)
    rng = np.random.RandomState(4)
    for _, adapter in lora.adapters(model):  # non-zero B: every factor gets a gradient
        adapter.b.set_value(jnp.asarray(rng.normal(0, 0.1, adapter.b.shape), jnp.float32))
    lora.save_peft(model, tmp_path / "adapter", config=config, base_model=str(path))

    lr, weight_decay = 1e-2, 0.01
    tokens = rng.randint(0, 90, (4, 12)).astype(np.int32)
    rows = SFTRows(tokens, np.ones_like(tokens, np.int8), np.ones_like(tokens))
    settings = TrainConfig(
        batch_size=4, epochs=2, learning_rate=lr, warmup_steps=0, schedule="constant", weight_decay=weight_decay,
        max_grad_norm=1.0, remat="none", checkpoint_every=0, eval_fraction=0,
    )  # fmt: skip
    history = train.finetune(model, rows, None, settings, out_dir=tmp_path / "run", progress=False)
    ours = [r["loss"] for r in history if "loss" in r]

    wrapped = peft.PeftModel.from_pretrained(hf, tmp_path / "adapter", is_trainable=True).train()
    trained = [p for p in wrapped.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trained, lr=lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=weight_decay)
    ids = torch.as_tensor(tokens, dtype=torch.long)
    theirs = []
    for _ in range(2):
        loss = wrapped(input_ids=ids, labels=ids).loss
        theirs.append(loss.item())
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trained, 1.0)
        optimizer.step()
        optimizer.zero_grad()
    np.testing.assert_allclose(ours[:2], theirs, rtol=1e-4)
    assert abs(theirs[1] - theirs[0]) > 10 * 1e-4 * theirs[0]  # the step moved the loss well beyond the tolerance


@pytest.mark.parametrize("kind", ["topk", "jumprelu"])
def test_sae_encode_matches_numpy(kind):
    d_in, d_sae = 64, 256
    sae = TopKSAE(d_in, d_sae, k=8, rngs=nnx.Rngs(0)) if kind == "topk" else JumpReLUSAE(d_in, d_sae, rngs=nnx.Rngs(0))
    rng = np.random.default_rng(5)
    for name in ("W_enc", "W_dec", "b_enc", "b_dec"):
        getattr(sae, name).set_value(rng.normal(scale=0.3, size=getattr(sae, name).shape).astype(np.float32))
    if kind == "jumprelu":
        sae.threshold.set_value(rng.uniform(0.0, 0.6, d_sae).astype(np.float32))
    x = rng.normal(size=(48, d_in)).astype(np.float32)
    p = {name: np.asarray(getattr(sae, name)[...], np.float64) for name in ("W_enc", "W_dec", "b_enc", "b_dec")}
    h = (x - p["b_dec"]) @ p["W_enc"] + p["b_enc"]
    # Entries whose fate rests on rounding (at the threshold, or tied at the top-k boundary) are not compared.
    if kind == "topk":
        top = -np.sort(-h, axis=1)
        assert (top[:, 7] - top[:, 8] > 1e-3).all(), "near-tie at the top-k boundary: pick another seed"
        expected = np.where(h >= top[:, 7:8], np.maximum(h, 0), 0)
        decided = np.ones_like(h, bool)
    else:
        threshold = np.asarray(sae.threshold[...], np.float64)
        expected = np.where(h > threshold, np.maximum(h, 0), 0)
        decided = np.abs(h - threshold) > 1e-3
        assert decided.mean() > 0.99
    graphdef, state = nnx.split(sae)
    encoded = np.asarray(jax.jit(lambda state, x: nnx.merge(graphdef, state).encode(x))(state, x))
    np.testing.assert_allclose(encoded[decided], expected[decided], rtol=1e-5, atol=1e-5 * np.abs(h).max())


# ---------------------------------------------------------------------------- every jitted step lowers for TPU


def _tiny(family_name, dtype="bfloat16"):
    configs = {
        "gemma2": dict(model_type="gemma2", vocab_size=128, hidden_size=64, intermediate_size=128,
                       num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                       sliding_window=8, query_pre_attn_scalar=16),
        "llama": dict(model_type="llama", vocab_size=128, hidden_size=64, intermediate_size=128,
                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=16),
        "gpt-oss": dict(model_type="gpt_oss", vocab_size=128, hidden_size=64, intermediate_size=64,
                        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                        num_local_experts=4, num_experts_per_tok=2, sliding_window=8),
    }  # fmt: skip
    return emjax.models.build(configs[family_name], seed=0, dtype=dtype)


def _lowers_for_tpu(fn, *args):
    assert jax.jit(fn).trace(*args).lower(lowering_platforms=("tpu",)).as_text()


@pytest.mark.parametrize("family_name", list(FAMILIES))
def test_forward_with_capture_lowers_for_tpu(family_name):
    graphdef, state = nnx.split(_tiny(family_name))
    ids = jnp.zeros((2, 16), jnp.int32)
    _lowers_for_tpu(lambda state, ids: nnx.merge(graphdef, state)(ids, capture=(0,), stop_at_layer=1).captured,
                    state, ids)  # fmt: skip


def test_lora_train_step_lowers_for_tpu():
    model = lora.attach(_tiny("gemma2"), LoRAConfig(rank=4, alpha=8))
    graphdef, params, paths, base = train.split_adapters(model)
    settings = TrainConfig(remat="block")
    optimizer, schedule = train.make_optimizer(settings, total_steps=10)
    loss_sums = train.micro_batch_loss(graphdef, paths, settings)
    step = train.jit_train_step(loss_sums, optimizer, schedule, seed=0, state_shardings=(None, None))
    batch = {
        "tokens": jnp.zeros((1, 2, 16), jnp.int32),
        "loss_mask": jnp.ones((1, 2, 16), jnp.int8),
        "segments": jnp.ones((1, 2, 16), jnp.int32),
    }
    traced = step.trace(params, optimizer.init(params), base, batch, jnp.int32(0))
    assert traced.lower(lowering_platforms=("tpu",)).as_text()


def test_generate_lowers_for_tpu():
    graphdef, state = nnx.split(_tiny("gemma2"))
    rows = 8
    lowered = _decode.trace(
        graphdef, state, jnp.zeros((rows, 16), jnp.int32), jnp.ones((rows, 16), jnp.int32),
        jnp.zeros((rows, 2), jnp.uint32), jnp.ones((rows,), bool), jnp.asarray([1], jnp.int32),
        jnp.float32(1.0), jnp.float32(1.0), max_new_tokens=8, kind="sample",
    ).lower(lowering_platforms=("tpu",))  # fmt: skip
    assert lowered.as_text()


def test_sae_encode_lowers_for_tpu():
    graphdef, state = nnx.split(TopKSAE(64, 256, k=8, rngs=nnx.Rngs(0), dtype=jnp.bfloat16))
    _lowers_for_tpu(lambda state, x: nnx.merge(graphdef, state).encode(x), state, jnp.zeros((32, 64), jnp.bfloat16))


def test_similarity_kernel_lowers_for_tpu():
    q = jax.ShapeDtypeStruct((300, 256), jnp.bfloat16)
    keys = jax.ShapeDtypeStruct((1000, 256), jnp.bfloat16)
    ids = jax.ShapeDtypeStruct((1000,), jnp.int32)
    lowered = topk_pallas.trace(q, keys, ids, 32, platform="tpu").lower(lowering_platforms=("tpu",))
    assert "tpu_custom_call" in lowered.as_text()
