"""The SAE modules against the formulas written out in numpy."""

import numpy as np
import pytest
from flax import nnx

from emjax.sae import BatchTopKSAE, JumpReLUSAE, ReLUSAE, TopKSAE

D_IN, D_SAE = 12, 40


def randomise(sae, rng):
    for name in ("W_enc", "W_dec", "b_enc", "b_dec"):
        var = getattr(sae, name)
        var.set_value(rng.normal(scale=0.5, size=var.shape).astype(np.float32))
    if isinstance(sae, JumpReLUSAE):
        sae.threshold.set_value(rng.uniform(0.0, 0.6, D_SAE).astype(np.float32))
    return {name: np.asarray(getattr(sae, name)[...], np.float64) for name in nnx.to_pure_dict(nnx.state(sae))}


def reference_pre(p, x, *, subtract_b_dec, scale):
    x = x * scale
    if subtract_b_dec:
        x = x - p["b_dec"]
    return x @ p["W_enc"] + p["b_enc"]


def assert_clear_boundary(ordered, k, margin=1e-4):
    """The k-th and (k+1)-th largest values (each row of `ordered`, descending) stand clear of each other,
    so which values are kept does not rest on float rounding."""
    assert (ordered[..., k - 1] - ordered[..., k] > margin).all(), "near-tie at the top-k boundary: pick another seed"


def reference_top_k(h, k):
    assert_clear_boundary(-np.sort(-h, axis=-1), k)
    out = np.zeros_like(h)
    index = np.argsort(-h, axis=-1)[:, :k]
    np.put_along_axis(out, index, np.maximum(np.take_along_axis(h, index, -1), 0), -1)
    return out


@pytest.mark.parametrize("subtract_b_dec", [True, False])
@pytest.mark.parametrize("scale", [1.0, 0.37])
@pytest.mark.parametrize("kind", ["relu", "jumprelu", "topk"])
def test_encode_decode_match_numpy(kind, subtract_b_dec, scale):
    rng = np.random.default_rng(0)
    kwargs = dict(rngs=nnx.Rngs(0), apply_b_dec_to_input=subtract_b_dec, input_scale=scale)
    sae = {
        "relu": lambda: ReLUSAE(D_IN, D_SAE, **kwargs),
        "jumprelu": lambda: JumpReLUSAE(D_IN, D_SAE, **kwargs),
        "topk": lambda: TopKSAE(D_IN, D_SAE, k=5, **kwargs),
    }[kind]()
    p = randomise(sae, rng)
    x = rng.normal(size=(16, D_IN)).astype(np.float32)

    h = reference_pre(p, x.astype(np.float64), subtract_b_dec=subtract_b_dec, scale=scale)
    if kind == "relu":
        f = np.maximum(h, 0)
    elif kind == "jumprelu":
        f = np.maximum(h, 0) * (h > p["threshold"])
    else:
        f = reference_top_k(h, 5)
    x_hat = (f @ p["W_dec"] + p["b_dec"]) / scale

    ours_f, ours_h = sae.encode_with_pre(x)
    np.testing.assert_allclose(ours_h, h, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(ours_f, f, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(sae.decode(ours_f), x_hat, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(sae(x), x_hat, rtol=1e-5, atol=1e-5)


def test_fold_input_scale_keeps_outputs():
    rng = np.random.default_rng(1)
    sae = JumpReLUSAE(D_IN, D_SAE, rngs=nnx.Rngs(0), input_scale=2.5)
    randomise(sae, rng)
    x = rng.normal(size=(8, D_IN)).astype(np.float32)
    before_f, before = np.asarray(sae.encode(x)), np.asarray(sae(x))
    sae.fold_input_scale()
    assert sae.input_scale == 1.0
    np.testing.assert_allclose(sae.encode(x), before_f, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(sae(x), before, rtol=1e-5, atol=1e-5)


def test_batch_topk_keeps_k_per_row_on_average():
    rng = np.random.default_rng(2)
    sae = BatchTopKSAE(D_IN, D_SAE, rngs=nnx.Rngs(0), k=3)
    p = randomise(sae, rng)
    x = rng.normal(size=(10, D_IN)).astype(np.float32)
    acts = np.maximum(reference_pre(p, x, subtract_b_dec=True, scale=1.0), 0)
    assert_clear_boundary(-np.sort(-acts.ravel()), 30)
    keep = np.sort(acts.ravel())[-30]
    f, _ = sae.encode_batch_topk(x)
    np.testing.assert_allclose(f, acts * (acts >= keep), rtol=1e-5, atol=1e-6)


def test_wrong_width_is_an_error():
    sae = ReLUSAE(D_IN, D_SAE, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="d_model 13.*d_in=12"):
        sae.encode(np.zeros((2, 13), np.float32))
