"""Streaming SAE feature statistics against numpy over the same activations; sharded = single; kill + resume."""

import jax
import numpy as np
import pytest
from flax import nnx

import emjax.models
import emjax.sae
from emjax import distributed
from emjax.feature_stats import load_samples, load_stats, sae_quality, stream_features
from emjax.sae import JumpReLUSAE, TopKSAE

ARCH = dict(
    model_type="gemma2", vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=3,
    num_attention_heads=4, num_key_value_heads=2, head_dim=8, sliding_window=4, query_pre_attn_scalar=8,
)  # fmt: skip
LAYERS = (0, 2)


def one_device():
    return distributed.make_mesh(devices=jax.devices()[:1])


D_SAE = 48


def random_sae(kind, seed):
    rng = np.random.default_rng(seed)
    sae = (
        JumpReLUSAE(32, D_SAE, rngs=nnx.Rngs(seed))
        if kind == "jumprelu"
        else TopKSAE(32, D_SAE, k=6, rngs=nnx.Rngs(seed))
    )
    sae.W_enc.set_value(rng.normal(scale=0.3, size=(32, D_SAE)).astype(np.float32))
    sae.b_enc.set_value(rng.normal(scale=0.5, size=D_SAE).astype(np.float32))
    sae.b_dec.set_value(rng.normal(scale=0.1, size=32).astype(np.float32))
    if kind == "jumprelu":
        threshold = rng.uniform(0.2, 1.0, D_SAE).astype(np.float32)
        threshold[:3] = 1e6  # dead features
        sae.threshold.set_value(threshold)
    return sae


@pytest.fixture(scope="module")
def setup():
    model = emjax.models.build(ARCH, seed=0, dtype="float32")
    saes = {0: random_sae("jumprelu", 1), 2: random_sae("topk", 2)}
    rng = np.random.default_rng(0)
    n, t = 11, 10
    tokens = rng.integers(1, 64, (n, t)).astype(np.int32)
    attention = np.ones((n, t), np.int32)
    attention[2, :4] = 0  # left padding
    attention[7, :9] = 0
    count = (rng.random((n, t)) < 0.6).astype(np.int8) * attention
    count[5] = 0  # a sample with no counted token
    return model, saes, tokens, attention, count


FORWARDS = {}


def forward_of(model):
    """One jitted forward per model, so the tests share compilations."""
    if id(model) not in FORWARDS:
        FORWARDS[id(model)] = (model, emjax.models.jit_forward(model, capture=LAYERS, stop_at_layer=max(LAYERS) + 1))
    return FORWARDS[id(model)][1]


def oracle(model, saes, tokens, attention, count):
    """Eager activations, SAE codes from sae.encode, every statistic in float64 numpy."""
    out = model(tokens, attention_mask=attention, capture=LAYERS)
    w = count.astype(bool)
    result = {}
    for layer, sae in saes.items():
        x = np.asarray(out.captured[layer], np.float64)
        f = np.asarray(sae.encode(x.astype(np.float32)), np.float64)
        h = np.asarray(sae.pre_activations(x.astype(np.float32)))
        x_hat = np.asarray(sae.decode(f.astype(np.float32)), np.float64)
        xs, fs = x[w], f[w]
        per = np.maximum(w.sum(1), 1)[:, None]
        result[layer] = dict(
            tokens=w.sum(),
            fire_count=(fs > 0).sum(0),
            sum=fs.sum(0),
            sum_sq=(fs**2).sum(0),
            max=fs.max(0),
            sse=((xs - x_hat[w]) ** 2).sum(),
            total_var=((xs - xs.mean(0)) ** 2).sum(),
            pooled=(f * w[..., None]).sum(1) / per,
            mean_residual=(x * w[..., None]).sum(1) / per,
            margin=np.abs(h[w] - np.asarray(getattr(sae, "threshold", np.zeros(D_SAE))[...])).min(),
        )
    return result


def run(model, saes, data, out, mesh, **kw):
    forward = kw.pop("forward", None) or forward_of(model)
    options = dict(batch_size=4, rows_per_chunk=5, progress=False) | kw
    return stream_features(forward, saes, *data, out, mesh=mesh, **options)


@pytest.mark.slow
def test_statistics_and_pooled_codes_match_numpy(setup, tmp_path):
    model, saes, *data = setup
    summary = run(model, saes, data, tmp_path, one_device())  # every non-zero pooled value kept
    ref = oracle(model, saes, *data)
    for layer in LAYERS:
        r = ref[layer]
        if layer == 0:
            assert r["margin"] > 1e-4, "test data too close to a JumpReLU threshold"
        stats = load_stats(tmp_path, layer)
        assert stats.tokens == r["tokens"] == data[2].sum()
        np.testing.assert_array_equal(stats.fire_count, r["fire_count"])
        np.testing.assert_allclose(stats.sum, r["sum"], rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(stats.sum_sq, r["sum_sq"], rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(stats.max, r["max"], rtol=1e-5, atol=1e-6)
        quality = sae_quality(stats)
        np.testing.assert_allclose(quality["fvu"], r["sse"] / r["total_var"], rtol=1e-4)
        np.testing.assert_allclose(quality["l0"], r["fire_count"].sum() / r["tokens"], rtol=1e-12)
        assert quality["dead_fraction"] == np.mean(r["fire_count"] == 0)
        assert summary["layers"][str(layer)]["quality"] == quality
        codes, residual, counted = load_samples(tmp_path, layer)
        np.testing.assert_array_equal(counted, data[2].sum(1))
        np.testing.assert_allclose(codes.dense(), r["pooled"], rtol=1e-5, atol=1e-6)
        np.testing.assert_array_equal((codes.values != 0).sum(1), (r["pooled"] != 0).sum(1))
        assert codes.values.shape[1] == (r["pooled"] != 0).sum(1).max() < D_SAE  # rows of unequal length, padded
        np.testing.assert_allclose(residual, r["mean_residual"], rtol=1e-5, atol=1e-5)
    assert load_stats(tmp_path, 0).fire_count[:3].sum() == 0  # the planted dead features


def test_top_codes_keep_the_largest_pooled_values(setup, tmp_path):
    model, saes, *data = setup
    run(model, saes, data, tmp_path, one_device(), top_codes=8)
    pooled = oracle(model, saes, *data)[0]["pooled"]
    codes, _, _ = load_samples(tmp_path, 0)
    assert codes.values.shape == (len(pooled), 8)
    np.testing.assert_allclose(codes.values, -np.sort(-pooled, axis=1)[:, :8], rtol=1e-5, atol=1e-6)
    chosen = np.take_along_axis(pooled, codes.indices.astype(int), 1)
    np.testing.assert_allclose(chosen, codes.values, rtol=1e-5, atol=1e-6)
    # A quality-only pass (no per-sample outputs) gives the same totals.
    summary = run(model, saes, data, tmp_path / "quality", one_device(), samples=False)
    assert not (tmp_path / "quality" / "layer0" / "samples.safetensors").exists()
    assert summary["layers"]["0"]["quality"] == sae_quality(load_stats(tmp_path, 0))


def test_eight_devices_equal_one(setup, tmp_path):
    model, saes, *data = setup
    one = one_device()
    run(model, saes, data, tmp_path / "one", one)
    mesh = distributed.make_mesh(data=4, tensor=2)
    sharded_model = emjax.models.build(ARCH, seed=0, dtype="float32", mesh=mesh)
    sharded_saes = {}
    for layer, sae in saes.items():  # through the SAELens format, loaded into shards (features over tensor)
        emjax.sae.save(sae, tmp_path / f"sae{layer}")
        sharded_saes[layer] = emjax.sae.load(tmp_path / f"sae{layer}", mesh=mesh)
    run(sharded_model, sharded_saes, data, tmp_path / "eight", mesh, batch_size=8)
    for layer in LAYERS:
        a, b = load_stats(tmp_path / "one", layer), load_stats(tmp_path / "eight", layer)
        np.testing.assert_array_equal(a.fire_count, b.fire_count)
        for name in ("sum", "sum_sq", "max", "resid_mean"):
            np.testing.assert_allclose(getattr(a, name), getattr(b, name), rtol=1e-5, atol=1e-5)
        (ca, ra, _), (cb, rb, _) = load_samples(tmp_path / "one", layer), load_samples(tmp_path / "eight", layer)
        np.testing.assert_allclose(ca.dense(), cb.dense(), rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(ra, rb, rtol=1e-5, atol=1e-5)


class Killed(Exception):
    pass


def test_killed_then_resumed_run_writes_identical_files(setup, tmp_path):
    model, saes, *data = setup
    mesh = one_device()
    forward = forward_of(model)
    calls = {"n": 0}

    def dies_after_three(ids, mask):
        calls["n"] += 1
        if calls["n"] > 3:
            raise Killed
        return forward(ids, mask)

    run(model, saes, data, tmp_path / "straight", mesh)
    with pytest.raises(Killed):
        run(model, saes, data, tmp_path / "resumed", mesh, forward=dies_after_three)
    assert len(list((tmp_path / "resumed" / "chunks").glob("*.safetensors"))) == 1  # 2 batches per chunk
    summary = run(model, saes, data, tmp_path / "resumed", mesh)
    assert summary["resumed_chunks"] == 1 and summary["chunks"] == 3
    for name in ["layer0/stats.safetensors", "layer2/samples.safetensors", "layer2/stats.safetensors"]:
        assert (tmp_path / "straight" / name).read_bytes() == (tmp_path / "resumed" / name).read_bytes()
    with pytest.raises(ValueError, match="other settings"):
        run(model, saes, data, tmp_path / "resumed", mesh, top_codes=4)


def test_count_mask_on_padding_is_an_error(setup, tmp_path):
    model, saes, tokens, attention, count = setup
    bad = count.copy()
    bad[2, 0] = 1
    with pytest.raises(ValueError, match=r"row 2, position 0"):
        run(model, saes, (tokens, attention, bad), tmp_path, one_device())
