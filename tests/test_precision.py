"""fp32 means fp32: every matmul on float32 operands asks for HIGHEST precision (emjax.precision).

On CPU every precision computes the same, so these tests read the traced
programs: each dot in a float32 forward, LoRA forward, jvp, SAE or kernel
must carry Precision.HIGHEST, bf16 dots must carry none (bf16 products, fp32
accumulation), and JAX's default-matmul-precision setting (the one opt-out)
must remove it. What the device then computes is test_accelerator's job.
"""

import jax
import jax.numpy as jnp
import pytest
from flax import nnx
from jax import lax

import emjax.models
from emjax import lora
from emjax.config import LoRAConfig
from emjax.kernels import similarity_topk
from emjax.kernels.similarity_pallas import topk_pallas
from emjax.precision import matmul_precision
from emjax.sae import TopKSAE

DOTS = ("dot_general", "ragged_dot_general")
CONFIGS = {
    "gemma2": dict(model_type="gemma2", vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                   num_attention_heads=4, num_key_value_heads=2, head_dim=8, sliding_window=4,
                   query_pre_attn_scalar=8),
    "gpt-oss": dict(model_type="gpt_oss", vocab_size=64, hidden_size=32, intermediate_size=32, num_hidden_layers=2,
                    num_attention_heads=4, num_key_value_heads=2, head_dim=8, num_local_experts=4,
                    num_experts_per_tok=2, sliding_window=4),
}  # fmt: skip


def dots(fn, *args):
    """[(primitive, operand dtypes, precision)] of every matmul in fn's program, nested ones included."""
    found = []

    def visit(jaxpr):
        for eqn in jaxpr.eqns:
            if eqn.primitive.name in DOTS:
                dtypes = tuple(str(v.aval.dtype) for v in eqn.invars[:2])
                found.append((eqn.primitive.name, dtypes, eqn.params["precision"]))
            for inner in jax.extend.core.jaxprs_in_params(eqn.params):
                visit(inner)
            if eqn.primitive.name == "pallas_call":  # the kernel body
                visit(eqn.params["jaxpr"])

    visit(jax.make_jaxpr(fn)(*args).jaxpr)
    assert found, "no matmul found: the walk missed the program"
    return found


def is_highest(precision) -> bool:
    return precision is not None and all(p == lax.Precision.HIGHEST for p in precision)


def assert_fp32_highest(found):
    for name, dtypes, precision in found:
        if all(d == "float32" for d in dtypes):
            assert is_highest(precision), (name, dtypes, precision)
        else:
            assert not is_highest(precision), (name, dtypes, precision)


def assert_user_precision(found):
    assert not any(is_highest(precision) for _, _, precision in found), found


def forward(model, capture=()):
    graphdef, state = nnx.split(model)
    ids = jnp.zeros((2, 6), jnp.int32)
    return (lambda state: nnx.merge(graphdef, state)(ids, capture=capture).logits), state


@pytest.mark.parametrize("name", list(CONFIGS))
def test_fp32_forward_dots_are_highest_and_the_setting_opts_out(name):
    fn, state = forward(emjax.models.build(CONFIGS[name], dtype="float32"))
    found = dots(fn, state)
    assert any(n == "ragged_dot_general" for n, _, _ in found) == (name == "gpt-oss")
    assert_fp32_highest(found)
    with jax.default_matmul_precision("tensorfloat32"):
        assert_user_precision(dots(fn, state))


@pytest.mark.parametrize("name", list(CONFIGS))
def test_bf16_forward_keeps_bf16_dots(name):
    fn, state = forward(emjax.models.build(CONFIGS[name], dtype="bfloat16"))
    found = dots(fn, state)
    assert any(dtypes == ("bfloat16", "bfloat16") for _, dtypes, _ in found)
    assert_fp32_highest(found)  # only the fp32 routing/combination dots of gpt-oss are fp32


def test_lora_forward_and_its_jvp_are_highest():
    """The derivation's first-order prediction: a jvp of the forward along the LoRA update."""
    model = lora.attach(emjax.models.build(CONFIGS["gemma2"], dtype="float32"), LoRAConfig(rank=2, alpha=4))
    fn, state = forward(model)
    assert_fp32_highest(dots(fn, state))
    tangent = jax.tree.map(jnp.ones_like, state)
    assert_fp32_highest(dots(lambda s, t: jax.jvp(fn, (s,), (t,)), state, tangent))


def test_sae_encode_decode_are_highest():
    sae = TopKSAE(16, 64, k=4, rngs=nnx.Rngs(0))
    graphdef, state = nnx.split(sae)
    x = jnp.ones((3, 16), jnp.float32)
    found = dots(lambda s, x: nnx.merge(graphdef, s)(x), state, x)
    assert len(found) == 2
    assert_fp32_highest(found)


def test_similarity_paths_are_highest_in_fp32_and_plain_in_bf16():
    q, keys, ids = jnp.ones((20, 32)), jnp.ones((50, 32)), jnp.arange(50, dtype=jnp.int32)
    for dtype, check in ((jnp.float32, is_highest), (jnp.bfloat16, lambda p: not is_highest(p))):
        xla = dots(lambda q, k: similarity_topk(q, k, 3, method="xla"), q.astype(dtype), keys.astype(dtype))
        kernel = dots(
            lambda q, k: topk_pallas(q, k, ids, 3, block_queries=16, block_keys=16, platform="gpu"),
            q.astype(dtype), keys.astype(dtype),
        )  # fmt: skip
        assert all(check(p) for _, _, p in xla + kernel), (dtype, xla, kernel)


def test_the_helper_reads_the_setting():
    assert matmul_precision(jnp.float32) == lax.Precision.HIGHEST
    assert matmul_precision(jnp.float32, jnp.bfloat16) is None
    assert matmul_precision(jnp.bfloat16) is None
    with jax.default_matmul_precision("tensorfloat32"):
        assert matmul_precision(jnp.float32) is None
