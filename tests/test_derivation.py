"""The derivation: first-order feature shifts by one jvp against exact and finite-difference changes,
LoRA tangents against merged weights, sharded against one device, and the dynamics monitor
against a direct numpy computation."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from scipy import stats

import emjax.models
from emjax import derivation, distributed, dynamics, lora, plots
from emjax.config import LoRAConfig
from emjax.loop import StopTraining
from emjax.sae import ReLUSAE

LLAMA = dict(
    model_type="llama", vocab_size=96, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
    num_attention_heads=4, num_key_value_heads=2, head_dim=8, tie_word_embeddings=False,
)  # fmt: skip
ALL = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def _model(lora_config, *, std=0.1, mesh=None, seed=0):
    model = emjax.models.build(LLAMA, seed=seed, dtype="float32", mesh=mesh)
    lora.attach(model, lora_config, seed=1, mesh=mesh)
    rng = np.random.default_rng(seed)
    for _, adapter in lora.adapters(model):
        for var in (adapter.a, adapter.b):
            var.set_value(jax.device_put(jnp.asarray(rng.normal(0, std, var.shape), jnp.float32), var.sharding))
    return model


def _sae(d_sae=40, seed=0):
    sae = ReLUSAE(LLAMA["hidden_size"], d_sae, rngs=nnx.Rngs(seed))
    rng = np.random.default_rng(seed + 7)
    sae.W_enc.set_value(jnp.asarray(rng.normal(0, 0.3, sae.W_enc.shape), jnp.float32))
    sae.b_enc.set_value(jnp.asarray(rng.normal(0, 0.1, sae.b_enc.shape), jnp.float32))
    sae.b_dec.set_value(jnp.asarray(rng.normal(0, 0.1, sae.b_dec.shape), jnp.float32))
    return sae


def _prompts(rows=6, length=7, seed=0):
    rng = np.random.default_rng(seed)
    tokens = rng.integers(0, LLAMA["vocab_size"], (rows, length)).astype(np.int32)
    mask = np.ones_like(tokens)
    mask[1, 4:] = 0  # padding is not counted
    mask[4, 2:] = 0
    return tokens, mask


def _at(model, path):
    """The variable at an nnx state path."""
    for name in path:
        model = model[name] if isinstance(name, int) else getattr(model, name)
    return model


def test_lora_tangent_equals_merged_weight_difference():
    cfg = LoRAConfig(rank=3, alpha=6, targets=ALL, layers=(1,))
    model, merged = _model(cfg), _model(cfg)
    tangents = derivation.lora_tangents(model)
    base = {p: np.asarray(_at(model, p)[...]) for p in tangents}
    lora.merge(merged)
    assert len(tangents) == len(ALL)
    for path, tangent in tangents.items():
        after = np.asarray(_at(merged, path)[...])
        np.testing.assert_allclose(np.asarray(tangent), after - base[path], rtol=1e-5, atol=1e-6)


def test_prediction_is_exact_when_the_features_are_linear_in_the_weights():
    """The residual after block 1 is linear in block 1's down projection (x + W_down g(x))."""
    model = _model(LoRAConfig(rank=4, alpha=8, targets=("down_proj",), layers=(1,)), std=0.5)
    tokens, mask = _prompts()
    shifts = derivation.feature_shifts(model, {1: _sae()}, tokens, mask, batch_size=4)[1]
    scale = np.max(np.abs(shifts["measured"]))
    assert scale > 1e-2
    np.testing.assert_allclose(shifts["predicted"], shifts["measured"], atol=1e-4 * scale)


def test_prediction_equals_a_finite_difference_for_small_updates():
    tokens, mask = _prompts()
    saes = {0: _sae(seed=1), 1: _sae(seed=2)}
    cfg = LoRAConfig(rank=4, alpha=8, targets=ALL)
    errors = {}
    for std in (0.01, 0.03):  # the update scale * A @ B grows ninefold
        out = derivation.feature_shifts(_model(cfg, std=std), saes, tokens, mask, batch_size=4)
        errors[std] = max(
            np.max(np.abs(s["predicted"] - s["measured"])) / np.max(np.abs(s["measured"])) for s in out.values()
        )
    assert errors[0.01] < 5e-2  # first order holds for a small update
    # and the residual is second order: it shrinks with the update (about ninefold; fp32 noise allowed)
    assert errors[0.03] > 4 * errors[0.01]


def test_sharded_over_eight_devices_equals_one_device():
    cfg = LoRAConfig(rank=2, alpha=4, targets=ALL)
    tokens, mask = _prompts(rows=5)
    saes = {0: _sae(seed=3), 1: _sae(seed=4)}
    single = derivation.feature_shifts(_model(cfg), saes, tokens, mask, batch_size=4)
    mesh = distributed.make_mesh(data=2, fsdp=2, tensor=2)
    sharded = derivation.feature_shifts(_model(cfg, mesh=mesh), saes, tokens, mask, batch_size=3, mesh=mesh)
    for layer in saes:
        for key in ("base", "tuned", "measured", "predicted"):
            np.testing.assert_allclose(sharded[layer][key], single[layer][key], rtol=1e-4, atol=1e-5)


def test_correlations_and_geometric_fit_match_scipy_and_closed_form():
    rng = np.random.default_rng(0)
    x = rng.normal(size=50)
    y = 0.5 * x + rng.normal(size=50)
    c = derivation.correlations(x, y, bootstrap=200)
    assert c["pearson"] == pytest.approx(stats.pearsonr(x, y)[0], abs=1e-10)
    assert c["spearman"] == pytest.approx(stats.spearmanr(x, y)[0], abs=1e-10)
    assert c["pearson_ci"][0] < c["pearson"] < c["pearson_ci"][1]
    w_dec = rng.normal(size=(30, 8))
    w_enc = rng.normal(size=(8, 30))
    d_t = w_dec[[2, 5]] / np.linalg.norm(w_dec[[2, 5]], axis=1, keepdims=True)
    d_t = d_t.mean(0) / np.linalg.norm(d_t.mean(0))
    measured = 3.0 * (w_enc.T @ d_t)  # the exact spillover law with alpha = 3
    measured[[7, 9]] += 10.0  # off-target features cannot move the fit
    alpha, geometric = derivation.geometric_prediction(w_enc, w_dec, [2, 5], measured)
    assert alpha == pytest.approx(3.0)
    np.testing.assert_allclose(geometric, 3.0 * (w_enc.T @ d_t))


def test_derive_reports_every_layer_and_the_toxic_features(tmp_path):
    model = _model(LoRAConfig(rank=4, alpha=8, targets=ALL), std=0.01)
    tokens, mask = _prompts()
    saes, target, toxic = {1: _sae()}, {1: [0, 1, 2]}, {1: [5, 6, 7]}
    report, shifts = derivation.derive(model, saes, tokens, mask, target=target, toxic=toxic, bootstrap=50)
    for path in derivation.plot_report(shifts, saes, target, toxic, tmp_path):
        assert path.stat().st_size > 0
    layer = report[1]
    assert [t["id"] for t in layer["toxic"]] == [5, 6, 7]
    assert layer["jvp_vs_measured"]["pearson"] > 0.95
    lo, hi = layer["alpha_ci"]
    assert lo <= layer["alpha"] <= hi and layer["premise_met"] == (layer["alpha"] > 0 and lo > 0)
    assert layer["samples"] == len(tokens) and layer["toxic_firing"]["change_ci"] is not None
    json.dumps(report, allow_nan=False)  # strict JSON: undefined is None
    with pytest.raises(ValueError, match="no target feature set"):
        derivation.derive(model, {1: _sae()}, tokens, mask, target={})


def test_the_random_update_has_the_real_norms_and_predicts_nothing_specific():
    """On the exactly linear case the jvp along the update is the measured shift; a random update of the
    same norm, weight by weight, is not (its r is the null the real one must beat)."""
    model = _model(LoRAConfig(rank=4, alpha=8, targets=("down_proj",), layers=(1,)), std=0.5)
    tangents = derivation.lora_tangents(model)
    random = derivation.random_tangents(tangents, seed=3)
    for path, t in tangents.items():
        t, r = np.asarray(t, np.float64), np.asarray(random[path], np.float64)
        assert np.linalg.norm(r) == pytest.approx(np.linalg.norm(t), rel=1e-5)
        assert abs((t * r).sum()) < 0.3 * np.linalg.norm(t) * np.linalg.norm(r)
    norm = derivation.update_norm(tangents)
    squares = sum(np.sum(np.asarray(t, np.float64) ** 2) for t in tangents.values())
    assert norm["total"] == pytest.approx(np.sqrt(squares))
    tokens, mask = _prompts(rows=12)
    report, _ = derivation.derive(model, {1: _sae()}, tokens, mask, target={1: [0, 1, 2]}, toxic={1: [4, 5, 6]},
                                  bootstrap=100, seed=1)  # fmt: skip
    layer = report[1]
    assert layer["prediction_error"]["value"] < 1e-3
    assert layer["null_prediction_error"]["value"] > 0.3
    assert layer["jvp_minus_null"]["ci"][0] > 0


def test_firing_and_per_row_sums_match_a_direct_computation():
    cfg = LoRAConfig(rank=4, alpha=8, targets=ALL)
    model, merged = _model(cfg, std=0.05), _model(cfg, std=0.05)
    lora.merge(merged)
    sae = _sae(d_sae=30)
    tokens, mask = _prompts()
    rows = derivation.feature_shifts(model, {1: sae}, tokens, mask, batch_size=4)[1]
    for _, adapter in lora.adapters(model):  # the base: the adapters at B = 0
        adapter.b.set_value(jnp.zeros_like(adapter.b[...]))
    for name, net in (("base", model), ("tuned", merged)):
        h = np.asarray(net(jnp.asarray(tokens), attention_mask=jnp.asarray(mask), capture=(1,)).captured[1])
        pre = np.asarray(sae.pre_activations(h), np.float64)
        fires = np.asarray(sae.encode(h)) > 0
        np.testing.assert_allclose(rows["rows"][name], np.einsum("bt,btf->bf", mask, pre), rtol=1e-4, atol=1e-4)
        np.testing.assert_array_equal(rows["rows"][f"fire_{name}"], np.einsum("bt,btf->bf", mask, fires))
    np.testing.assert_array_equal(rows["tokens"], mask.sum(1))


def test_bootstrap_over_samples_covers_the_true_mean_shift():
    """Intervals from resampling samples: a planted per-sample shift of the toxic features with mean 0.5;
    about 95% of the intervals over independent probe sets cover it (binomial bounds)."""
    rng = np.random.default_rng(0)
    d, n = 12, 20
    w_dec = rng.normal(size=(d, 6))
    w_enc = w_dec.T.copy()
    covered = 0
    for trial in range(120):
        tokens = rng.integers(3, 9, n).astype(float)
        base = rng.normal(size=(n, d)) * tokens[:, None]
        shift = 0.5 + rng.normal(0, 1.0, (n, 1))  # per sample, shared by the toxic features
        tuned = base + np.where(np.arange(d) >= 8, shift, 0.1 * rng.normal(size=(n, d))) * tokens[:, None]
        fire = rng.integers(0, 3, (n, d)).astype(float)
        shifts = {"rows": {"base": base, "tuned": tuned, "predicted": tuned - base, "predicted_null": base,
                           "fire_base": fire, "fire_tuned": fire}, "tokens": tokens}  # fmt: skip
        r = derivation.layer_report(shifts, w_enc, w_dec, [0, 1], [8, 9, 10, 11], bootstrap=300, seed=trial)
        lo, hi = r["measured_mean"]["toxic_ci"]
        covered += lo <= 0.5 <= hi
    assert 0.85 <= covered / 120 <= 0.99


def _direct_means(model, sae, tokens, mask, layer):
    """The model's forward and a numpy ReLU SAE: mean hidden state and mean activation per feature."""
    forward = emjax.models.jit_forward(model, capture=(layer,))
    h = np.asarray(forward(jnp.asarray(tokens), jnp.asarray(mask)).captured[layer])
    w = mask.astype(np.float64)[..., None]
    acts = np.maximum((h - np.asarray(sae.b_dec[...])) @ np.asarray(sae.W_enc[...]) + np.asarray(sae.b_enc[...]), 0)
    return (h * w).sum((0, 1)) / w.sum(), (acts * w).sum((0, 1)) / w.sum()


def _unit_mean(rows):
    rows = rows / np.linalg.norm(rows, axis=1, keepdims=True)
    return rows.mean(0) / np.linalg.norm(rows.mean(0))


def _cos(a, b):
    return a @ b / (np.linalg.norm(a) * np.linalg.norm(b))


def test_monitor_numbers_equal_a_direct_computation(tmp_path):
    model = _model(LoRAConfig(rank=4, alpha=8, targets=ALL), std=0.0)  # B = 0: the base
    sae = _sae()
    tokens, mask = _prompts()
    sets = {"inducing": {1: [0, 3]}, "control": {1: [4, 8, 9]}, "toxic": {1: [10, 11]}}
    monitor = dynamics.DynamicsMonitor(model, {1: sae}, tokens, mask, sets, tmp_path / "dynamics.jsonl", every=5)
    base_h, _ = _direct_means(model, sae, tokens, mask, 1)
    rng = np.random.default_rng(3)
    for _, adapter in lora.adapters(model):
        adapter.a.set_value(jnp.asarray(rng.normal(0, 0.3, adapter.a.shape), jnp.float32))
        adapter.b.set_value(jnp.asarray(rng.normal(0, 0.2, adapter.b.shape), jnp.float32))
    monitor(3, {"loss": 1.5}, model)  # not a measuring step
    monitor(10, {"loss": 1.25, "lr": jnp.asarray(0.1)}, model)
    records = [json.loads(line) for line in (tmp_path / "dynamics.jsonl").read_text().splitlines()]
    assert len(records) == 1 and records[0]["step"] == 10 and records[0]["loss"] == 1.25
    h, acts = _direct_means(model, sae, tokens, mask, 1)
    w_dec, w_enc = np.asarray(sae.W_dec[...]), np.asarray(sae.W_enc[...]).T
    for name, by_layer in sets.items():
        ids = by_layer[1]
        got = records[0]["layers"]["1"][name]
        dec, enc = _unit_mean(w_dec[ids]), _unit_mean(w_enc[ids])
        assert got["activation"] == pytest.approx(acts[ids].mean(), rel=1e-4, abs=1e-6)
        assert got["decoder_cosine"] == pytest.approx(_cos(h, dec), abs=1e-4)
        assert got["encoder_cosine"] == pytest.approx(_cos(h, enc), abs=1e-4)
        assert got["shift_decoder_cosine"] == pytest.approx(_cos(h - base_h, dec), abs=1e-3)
        assert got["shift_encoder_cosine"] == pytest.approx(_cos(h - base_h, enc), abs=1e-3)
    plots.plot_dynamics(tmp_path / "dynamics.jsonl", tmp_path / "dynamics.png")
    assert (tmp_path / "dynamics.png").stat().st_size > 0


def test_a_resumed_monitor_replaces_the_records_it_measures_again(tmp_path):
    model = _model(LoRAConfig(rank=4, alpha=8, targets=ALL), std=0.0)
    tokens, mask = _prompts()
    sets = {"toxic": {1: [10, 11]}}
    path = tmp_path / "dynamics.jsonl"
    first = dynamics.DynamicsMonitor(model, {1: _sae()}, tokens, mask, sets, path, every=2)
    for step in range(1, 7):  # measured at 2, 4, 6; then killed, resumed from a checkpoint at step 3
        first(step, {"loss": 1.0}, model)
    resumed = dynamics.DynamicsMonitor(model, {1: _sae()}, tokens, mask, sets, path, every=2)
    for step in range(4, 9):
        resumed(step, {"loss": 2.0}, model)
    records = [json.loads(line) for line in path.read_text().splitlines()]
    assert [(r["step"], r["loss"]) for r in records] == [(2, 1.0), (4, 2.0), (6, 2.0), (8, 2.0)]
    assert resumed.records == records


def test_monitor_names_risen_toxic_features_and_stops(tmp_path, caplog):
    model = _model(LoRAConfig(rank=4, alpha=8, targets=ALL), std=0.0)
    sae = _sae()
    tokens, mask = _prompts()
    rng = np.random.default_rng(5)
    before = [(adapter, adapter.b[...]) for _, adapter in lora.adapters(model)]
    _, base_acts = _direct_means(model, sae, tokens, mask, 1)
    for _, adapter in lora.adapters(model):
        adapter.a.set_value(jnp.asarray(rng.normal(0, 0.3, adapter.a.shape), jnp.float32))
        adapter.b.set_value(jnp.asarray(rng.normal(0, 0.3, adapter.b.shape), jnp.float32))
    _, acts = _direct_means(model, sae, tokens, mask, 1)
    rise = acts - base_acts
    order = np.argsort(rise)
    threshold = float(rise[order[-2]] + rise[order[-3]]) / 2  # exactly two features rise past it
    toxic = [int(order[-1]), int(order[0]), int(order[-2])]
    risen = [int(order[-1]), int(order[-2])]
    for adapter, b in before:  # back to the base (B = 0) to build the monitors
        adapter.b.set_value(b)
    sets = {"toxic": {1: toxic}}
    warn = dynamics.DynamicsMonitor(model, {1: sae}, tokens, mask, sets, tmp_path / "a.jsonl", every=1,
                                      threshold=threshold)  # fmt: skip
    stop = dynamics.DynamicsMonitor(model, {1: sae}, tokens, mask, sets, tmp_path / "b.jsonl", every=1,
                                      threshold=threshold, stop=True)  # fmt: skip
    rng = np.random.default_rng(5)
    for _, adapter in lora.adapters(model):
        adapter.a.set_value(jnp.asarray(rng.normal(0, 0.3, adapter.a.shape), jnp.float32))
        adapter.b.set_value(jnp.asarray(rng.normal(0, 0.3, adapter.b.shape), jnp.float32))
    warn(7, {}, model)
    assert [r["feature"] for r in warn.records[0]["toxic_risen"]] == risen
    assert "step 7" in caplog.text
    with pytest.raises(StopTraining, match=f"step 8: .*feature {risen[0]}"):
        stop(8, {}, model)
