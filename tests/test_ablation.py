"""Concept ablation in the forward and the toxic-feature penalty (emjax.ablation), against numpy and transformers."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

import emjax.models
from emjax import ablation, distributed, lora
from emjax.config import LoRAConfig
from emjax.sae.model import JumpReLUSAE
from hf_oracle import assert_close, random_llama

D = 32  # hidden size of random_llama
LAYERS = 3


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return random_llama(tmp_path_factory.mktemp("ablation"))


@pytest.fixture(scope="module")
def ids():
    return np.random.RandomState(0).randint(0, 90, (2, 7))


def _basis(k, seed):
    return ablation.orthonormal_basis(np.random.RandomState(seed).normal(size=(k, D)))


def _project(h, q):
    h = np.asarray(h, np.float64)
    return h - (h @ q.T.astype(np.float64)) @ q.astype(np.float64)


def _hf_ablated(hf, ids, bases):
    """transformers' logits with the residual after each block in `bases` projected (a forward hook), and
    the projected residuals."""
    seen = {}

    def hook(layer):
        def project(module, args, out):
            hidden = out[0] if isinstance(out, tuple) else out
            new = torch.as_tensor(_project(hidden.numpy(), bases[layer]), dtype=hidden.dtype)
            seen[layer] = new.numpy()
            return (new, *out[1:]) if isinstance(out, tuple) else new

        return project

    handles = [hf.model.layers[layer].register_forward_hook(hook(layer)) for layer in bases]
    try:
        with torch.no_grad():
            logits = hf(torch.as_tensor(ids)).logits.numpy()
    finally:
        for handle in handles:
            handle.remove()
    return logits, seen


@pytest.mark.slow
def test_ablated_forward_equals_projection_of_the_residual(checkpoint, ids):
    hf, path = checkpoint
    model = emjax.models.load(path, dtype="float32")
    bases = {0: _basis(3, 1), 1: _basis(5, 2)}
    plain = model(jnp.asarray(ids), capture=(0, 1))
    out = model(jnp.asarray(ids), capture=(0, 1), ablate={k: jnp.asarray(q) for k, q in bases.items()})
    # The first ablated layer: numpy's projection of the plain forward's residual there.
    assert_close(out.captured[0], _project(plain.captured[0], bases[0]), rel=1e-5)
    assert np.abs(np.asarray(out.captured[0]) @ bases[0].T).max() < 1e-5 * np.abs(plain.captured[0]).max()
    # Downstream: transformers with the projection injected by hooks after the same blocks.
    ref_logits, ref_seen = _hf_ablated(hf, ids, bases)
    assert_close(out.captured[1], ref_seen[1])
    assert_close(out.logits, ref_logits)
    assert np.abs(np.asarray(out.logits) - np.asarray(plain.logits)).max() > 1e-2 * np.abs(ref_logits).max()


def test_no_directions_is_the_plain_forward_bit_for_bit(checkpoint, ids):
    _, path = checkpoint
    model = emjax.models.load(path, dtype="float32")
    tokens = jnp.asarray(ids)
    plain = emjax.models.jit_forward(model, capture=(1,))(tokens)
    for ablate in (None, {1: jnp.zeros((0, D))}):
        out = emjax.models.jit_forward(model, capture=(1,), ablate=ablate)(tokens)
        np.testing.assert_array_equal(np.asarray(out.logits), np.asarray(plain.logits))
        np.testing.assert_array_equal(np.asarray(out.captured[1]), np.asarray(plain.captured[1]))


def test_ablation_with_lora_attached(checkpoint, ids):
    _, path = checkpoint
    model = emjax.models.load(path, dtype="float32")
    config = LoRAConfig(rank=2, alpha=4, targets=("q_proj", "v_proj", "down_proj"))
    lora.attach(model, config)
    rng = np.random.RandomState(4)
    for _, adapter in lora.adapters(model):
        adapter.b.set_value(jnp.asarray(rng.normal(0, 0.3, adapter.b.shape), jnp.float32))
    tokens, ablate = jnp.asarray(ids), {1: jnp.asarray(_basis(4, 5))}
    plain = model(tokens, capture=(1,))
    out = model(tokens, capture=(1,), ablate=ablate)
    assert_close(out.captured[1], _project(plain.captured[1], np.asarray(ablate[1])), rel=1e-5)
    # Merged into the weights, the same adapter gives the same ablated forward.
    adapted = np.asarray(out.logits)
    lora.merge(model)
    assert_close(model(tokens, ablate=ablate).logits, adapted, rel=1e-5)


def test_without_adapters_is_the_base_forward(checkpoint, ids):
    _, path = checkpoint
    base = emjax.models.load(path, dtype="float32")
    expected = np.asarray(base(jnp.asarray(ids)).logits)
    model = lora.attach(emjax.models.load(path, dtype="float32"), LoRAConfig(rank=2, alpha=4, targets=("q_proj",)))
    for _, adapter in lora.adapters(model):
        adapter.b.set_value(jnp.ones(adapter.b.shape, jnp.float32))
    assert np.abs(np.asarray(model(jnp.asarray(ids)).logits) - expected).max() > 1e-3
    stripped = jax.jit(lambda m, t: ablation.without_adapters(m)(t).logits)(model, jnp.asarray(ids))
    assert_close(stripped, expected, rel=1e-5)  # jitted here, eager there: equal up to rounding
    assert np.abs(np.asarray(model(jnp.asarray(ids)).logits) - expected).max() > 1e-3  # model left as it was


def test_sharded_ablated_forward_equals_single_device(checkpoint, ids):
    _, path = checkpoint
    ablate = {0: jnp.asarray(_basis(3, 6)), 2: jnp.asarray(_basis(2, 7))}
    single = emjax.models.jit_forward(emjax.models.load(path, dtype="float32"), capture=(0,), ablate=ablate)
    expected = single(jnp.asarray(ids))
    mesh = distributed.make_mesh(data=2, fsdp=2, tensor=2)
    model = emjax.models.load(path, dtype="float32", mesh=mesh)
    tokens = np.concatenate([ids, ids[::-1]])  # 4 rows over data x fsdp
    batch = distributed.shard_batch({"ids": tokens}, mesh)
    out = emjax.models.jit_forward(model, capture=(0,), ablate=ablate)(batch["ids"])
    assert_close(out.logits[:2], expected.logits, rel=1e-5)
    assert_close(out.captured[0][:2], expected.captured[0], rel=1e-5)


def test_bad_ablation_is_refused(checkpoint, ids):
    _, path = checkpoint
    model = emjax.models.load(path, dtype="float32")
    with pytest.raises(ValueError, match=r"ablate\[1\] has shape \(2, 31\)"):
        model(jnp.asarray(ids), ablate={1: jnp.zeros((2, 31))})
    with pytest.raises(ValueError, match="ablate layers \\[2\\] are outside 0..1"):
        model(jnp.asarray(ids), stop_at_layer=2, ablate={2: jnp.zeros((1, D))})


# ---------------------------------------------------------------------------- bases and controls


def test_orthonormal_basis_spans_the_directions_and_drops_degenerate_ones(caplog):
    rng = np.random.RandomState(0)
    a, b, c = rng.normal(size=(3, 16))
    directions = np.stack([a, 3 * b, a + b, -2 * a, np.zeros(16), c, 1e-9 * rng.normal(size=16) + b])
    q = ablation.orthonormal_basis(directions)
    assert q.shape == (3, 16) and q.dtype == np.float32
    np.testing.assert_allclose(q @ q.T, np.eye(3), atol=1e-6)
    u, s, _ = np.linalg.svd(np.stack([a, b, c]).T, full_matrices=False)  # the true span, by SVD
    np.testing.assert_allclose(q.T @ q, u @ u.T, atol=1e-5)
    assert "4 of 7 directions dropped" in caplog.text
    with pytest.raises(ValueError, match="all 2 directions are zero"):
        ablation.orthonormal_basis(np.zeros((2, 4)))
    with pytest.raises(ValueError, match=r"\[k, d_model\]"):
        ablation.orthonormal_basis(np.zeros(4))


def test_random_features_are_seeded_distinct_and_avoid_excluded():
    toxic = [3, 7, 11]
    a = ablation.random_features(20, 5, seed=1, exclude=toxic)
    assert len(set(a.tolist())) == 5 and not set(a.tolist()) & set(toxic) and a.max() < 20
    np.testing.assert_array_equal(a, ablation.random_features(20, 5, seed=1, exclude=toxic))
    assert any(not np.array_equal(a, ablation.random_features(20, 5, seed=s, exclude=toxic)) for s in range(2, 6))
    with pytest.raises(ValueError, match="cannot draw 18 random features from 17"):
        ablation.random_features(20, 18, seed=0, exclude=toxic)


def _sae(seed, d_sae=12):
    sae = JumpReLUSAE(D, d_sae, rngs=nnx.Rngs(seed), threshold=0.1, input_scale=1.7)
    rng = np.random.RandomState(seed)
    sae.b_enc.set_value(jnp.asarray(rng.normal(size=d_sae), jnp.float32))
    sae.b_dec.set_value(jnp.asarray(rng.normal(size=D), jnp.float32))
    sae.W_enc.set_value(jnp.asarray(rng.normal(size=(D, d_sae)), jnp.float32))
    return sae


def _numpy_pre(sae, x):
    x = np.asarray(x, np.float64) * sae.input_scale - np.asarray(sae.b_dec[...])
    return x @ np.asarray(sae.W_enc[...], np.float64) + np.asarray(sae.b_enc[...])


def test_restricted_sae_and_ablation_bases():
    sae, idx = _sae(0), [5, 1, 9]
    x = np.random.RandomState(1).normal(size=(2, 3, D)).astype(np.float32)
    sub = ablation.restrict(sae, idx)
    assert_close(sub.pre_activations(jnp.asarray(x)), _numpy_pre(sae, x)[..., idx], rel=1e-5)
    assert sae.d_sae == 12 and sub.d_sae == 3  # the original is untouched
    np.testing.assert_array_equal(ablation.feature_directions(sae, idx), np.asarray(sae.W_dec[...])[idx])
    bases = ablation.ablation_bases({1: sae}, {1: idx})
    u, _, _ = np.linalg.svd(np.asarray(sae.W_dec[...])[idx].T, full_matrices=False)
    np.testing.assert_allclose(np.asarray(bases[1]).T @ np.asarray(bases[1]), u @ u.T, atol=1e-5)
    with pytest.raises(ValueError, match=r"indices \[12\] are outside 0..11"):
        ablation.restrict(sae, [12])


# ---------------------------------------------------------------------------- the penalty


def _numpy_penalty(z_ft, z_base, mask):
    per_token = np.mean(np.maximum(z_ft - z_base, 0) ** 2, axis=-1)
    return np.sum(per_token * mask) / np.sum(mask)


def test_toxic_penalty_value_and_gradient_against_finite_differences():
    rng = np.random.RandomState(0)
    z_ft, z_base = rng.normal(size=(2, 5, 8)), rng.normal(size=(2, 5, 8))
    mask, toxic = (rng.uniform(size=(2, 5)) > 0.3).astype(np.float64), np.array([0, 3, 6])
    with jax.enable_x64(True):
        value = ablation.toxic_penalty(jnp.asarray(z_ft), jnp.asarray(z_base), toxic, mask=jnp.asarray(mask))
        np.testing.assert_allclose(value, _numpy_penalty(z_ft[..., toxic], z_base[..., toxic], mask), rtol=1e-12)
        grad = np.asarray(
            jax.grad(lambda z: ablation.toxic_penalty(z, jnp.asarray(z_base), toxic, mask=jnp.asarray(mask)))(
                jnp.asarray(z_ft)
            )
        )
    eps, numeric = 1e-6, np.zeros_like(z_ft)
    for i in np.ndindex(z_ft.shape):
        step = np.zeros_like(z_ft)
        step[i] = eps
        plus = _numpy_penalty((z_ft + step)[..., toxic], z_base[..., toxic], mask)
        minus = _numpy_penalty((z_ft - step)[..., toxic], z_base[..., toxic], mask)
        numeric[i] = (plus - minus) / (2 * eps)
    np.testing.assert_allclose(grad, numeric, atol=1e-8)
    assert np.abs(grad).max() > 0 and np.all(grad[..., [1, 2, 4, 5, 7]] == 0)  # only toxic features count


def _penalty_setup(path):
    model = emjax.models.load(path, dtype="float32")
    base = emjax.models.load(path, dtype="float32")
    config = LoRAConfig(rank=2, alpha=4, targets=("q_proj", "v_proj", "o_proj", "up_proj"), layers=(0, 1))
    lora.attach(model, config)
    rng = np.random.RandomState(2)
    for _, adapter in lora.adapters(model):
        adapter.b.set_value(jnp.asarray(rng.normal(0, 0.3, adapter.b.shape), jnp.float32))
    saes, toxic = {0: _sae(1), 1: _sae(2)}, {0: [2, 4, 8], 1: [0, 11]}
    return model, base, saes, toxic


def test_penalty_loss_value_against_numpy(checkpoint, ids):
    _, path = checkpoint
    model, base, saes, toxic = _penalty_setup(path)
    segments = np.ones(ids.shape, np.int32)
    segments[1, 5:] = 0
    loss_mask = np.zeros(ids.shape, np.int8)
    loss_mask[:, 3:] = 1
    batch = {"tokens": jnp.asarray(ids), "segments": jnp.asarray(segments), "loss_mask": jnp.asarray(loss_mask)}
    tuned = model(batch["tokens"], segment_ids=batch["segments"], capture=(0, 1)).captured
    plain = base(batch["tokens"], segment_ids=batch["segments"], capture=(0, 1)).captured
    for tokens, mask in (("all", segments > 0), ("assistant", (segments > 0) & (loss_mask > 0))):
        per_layer = [
            _numpy_penalty(_numpy_pre(saes[k], tuned[k])[..., toxic[k]], _numpy_pre(saes[k], plain[k])[..., toxic[k]],
                           mask)
            for k in (0, 1)
        ]  # fmt: skip
        extra = ablation.penalty_loss(saes, toxic, 0.5, tokens=tokens)
        value, metrics = jax.jit(extra)(model, batch)
        assert per_layer[0] > 0 and per_layer[1] > 0
        np.testing.assert_allclose(metrics["toxic_penalty/1"], per_layer[1], rtol=1e-4)
        np.testing.assert_allclose(value, 0.5 * np.mean(per_layer), rtol=1e-4)
    value, metrics = ablation.penalty_loss(saes, toxic, 0.0)(model, batch)
    assert float(value) == 0.0 and metrics == {}


def test_penalty_loss_gradient_against_finite_difference(checkpoint, ids):
    _, path = checkpoint
    model, _, saes, toxic = _penalty_setup(path)
    extra = ablation.penalty_loss(saes, toxic, 1.0)
    batch = {"tokens": jnp.asarray(ids)}
    graphdef, factors, rest = nnx.split(model, lora.LoRAParam, ...)

    def loss(factors):
        return extra(nnx.merge(graphdef, factors, rest), batch)[0]

    grad = jax.jit(jax.grad(loss))(factors)
    rng = np.random.RandomState(3)
    direction = jax.tree.map(lambda x: jnp.asarray(rng.normal(size=x.shape), jnp.float32), factors)
    analytic = sum(float(jnp.vdot(g, v)) for g, v in zip(jax.tree.leaves(grad), jax.tree.leaves(direction)))
    eps = 1e-3
    shifted = jax.jit(lambda s: loss(jax.tree.map(lambda f, v: f + s * v, factors, direction)))
    numeric = (float(shifted(eps)) - float(shifted(-eps))) / (2 * eps)
    assert abs(analytic) > 1e-3
    np.testing.assert_allclose(analytic, numeric, rtol=2e-2)
    # Every adapter before the last SAE layer moves the penalty.
    assert all(float(jnp.abs(g).max()) > 0 for g in jax.tree.leaves(grad) if g.ndim)
