"""emjax.sae.load against independent oracles, through files written in each release's format.

Oracles: sae-lens (its own format, its Gemma Scope and Llama Scope converters),
eai-sparsify (sparsify), the Llama Scope reference formula and dictionary_learning's
formulas written out in torch/numpy. JumpReLU supports are compared away from
the threshold (fp32 entries within ~1e-6 of it may flip); reconstructions everywhere.
"""

import collections
import json
import math
import os
import pickle
import zipfile

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

import emjax.sae
from emjax.sae import JumpReLUSAE, SAELoadError, TopKSAE
from emjax.sae.unpickle import UnsafePickleError

sae_lens = pytest.importorskip("sae_lens")
sparsify = pytest.importorskip("sparsify")
pretrained_loaders = pytest.importorskip("sae_lens.loading.pretrained_sae_loaders")

D_IN, D_SAE = 16, 48
TOL = dict(rtol=1e-5, atol=1e-5)


@pytest.fixture
def x():
    return np.random.default_rng(0).normal(size=(32, D_IN)).astype(np.float32)


def randomise_torch(module, seed, thresholds=(0.0, 0.6)):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if "threshold" in name:
                p.copy_(torch.empty(p.shape).uniform_(*thresholds, generator=g))
            else:
                p.copy_(0.5 * torch.randn(p.shape, generator=g))
    return module


def away_from(h, threshold, margin=1e-4):
    return np.abs(h - threshold) > margin


def assert_top_k_is_clear(h, k, margin=1e-4):
    """A top-k choice must not rest on rounding: in every row the k-th largest positive
    pre-activation stands clear of the next (ties at zero do not change the output)."""
    top = -np.sort(-np.maximum(np.asarray(h, np.float64), 0), axis=-1)
    kth, following = top[:, k - 1], top[:, k]
    assert ((kth - following > margin) | (kth == 0)).all(), "near-tie at the top-k boundary: pick another seed"


def dense(values, index, width):
    out = np.zeros((values.shape[0], width), np.float32)
    np.put_along_axis(out, index.astype(np.int64), values, -1)
    return out


# ---------------------------------------------------------------------------- SAELens


SAELENS_CASES = {
    "standard": lambda: sae_lens.StandardSAE(sae_lens.StandardSAEConfig(d_in=D_IN, d_sae=D_SAE)),
    "standard-no-b_dec": lambda: sae_lens.StandardSAE(
        sae_lens.StandardSAEConfig(d_in=D_IN, d_sae=D_SAE, apply_b_dec_to_input=False)
    ),
    "jumprelu": lambda: sae_lens.JumpReLUSAE(
        sae_lens.JumpReLUSAEConfig(d_in=D_IN, d_sae=D_SAE, apply_b_dec_to_input=False)
    ),
    "jumprelu-b_dec": lambda: sae_lens.JumpReLUSAE(sae_lens.JumpReLUSAEConfig(d_in=D_IN, d_sae=D_SAE)),
    "topk": lambda: sae_lens.TopKSAE(sae_lens.TopKSAEConfig(d_in=D_IN, d_sae=D_SAE, k=6)),
    "topk-rescaled": lambda: sae_lens.TopKSAE(
        sae_lens.TopKSAEConfig(d_in=D_IN, d_sae=D_SAE, k=6, rescale_acts_by_decoder_norm=True)
    ),
}


@pytest.mark.parametrize("case", sorted(SAELENS_CASES))
def test_saelens_directory_matches_sae_lens(case, x, tmp_path):
    oracle = randomise_torch(SAELENS_CASES[case](), seed=1)
    oracle.save_model(tmp_path)
    sae = emjax.sae.load(tmp_path)
    with torch.no_grad():
        want_f = oracle.encode(torch.from_numpy(x)).numpy()
        want = oracle(torch.from_numpy(x)).numpy()
    f = np.asarray(sae.encode(x))
    np.testing.assert_allclose(sae(x), want, **TOL)
    if isinstance(sae, JumpReLUSAE):
        h = np.asarray(sae.pre_activations(x))
        keep = away_from(h, np.asarray(sae.threshold[...]))
        np.testing.assert_allclose(f[keep], want_f[keep], **TOL)
    else:
        if isinstance(sae, TopKSAE):
            assert_top_k_is_clear(sae.pre_activations(x), sae.k)
        np.testing.assert_allclose(f, want_f, **TOL)


# ---------------------------------------------------------------------------- Gemma Scope


def gemma_scope_params(seed):
    rng = np.random.default_rng(seed)
    return {
        "W_enc": rng.normal(scale=0.5, size=(D_IN, D_SAE)).astype(np.float32),
        "W_dec": rng.normal(scale=0.5, size=(D_SAE, D_IN)).astype(np.float32),
        "b_enc": rng.normal(scale=0.5, size=D_SAE).astype(np.float32),
        "b_dec": rng.normal(scale=0.5, size=D_IN).astype(np.float32),
        "threshold": rng.uniform(0.0, 0.8, D_SAE).astype(np.float32),
    }


@pytest.mark.parametrize("compressed", [False, True])
def test_gemma_scope_npz_matches_the_jumprelu_formula(compressed, x, tmp_path):
    p = gemma_scope_params(2)
    (np.savez_compressed if compressed else np.savez)(tmp_path / "params.npz", **p)
    sae = emjax.sae.load(tmp_path)
    assert emjax.sae.detect(tmp_path / "params.npz") == "gemma_scope"
    h = x.astype(np.float64) @ p["W_enc"] + p["b_enc"]  # raw input: no b_dec subtraction, no scaling
    f = np.maximum(h, 0) * (h > p["threshold"])
    keep = away_from(h, p["threshold"])
    np.testing.assert_allclose(np.asarray(sae.encode(x))[keep], f[keep], **TOL)
    np.testing.assert_allclose(sae(x), f @ p["W_dec"] + p["b_dec"], **TOL)


def test_gemma_scope_npz_matches_sae_lens_converter(x, tmp_path, monkeypatch):
    p = gemma_scope_params(3)
    np.savez(tmp_path / "params.npz", **p)
    monkeypatch.setattr(pretrained_loaders, "hf_hub_download", lambda **kw: str(tmp_path / "params.npz"))
    cfg, state, _ = pretrained_loaders.gemma_2_sae_huggingface_loader(
        "google/gemma-scope-2b-pt-res", "layer_3/width_16k/average_l0_10", cfg_overrides={"d_in": D_IN, "d_sae": D_SAE}
    )
    oracle = sae_lens.JumpReLUSAE(
        sae_lens.JumpReLUSAEConfig.from_dict(pretrained_loaders.handle_config_defaulting(cfg))
    )
    oracle.load_state_dict(state)
    sae = emjax.sae.load(tmp_path / "params.npz")
    with torch.no_grad():
        want = oracle(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(sae(x), want, **TOL)


def test_npz_with_python_objects_is_refused(tmp_path):
    np.savez(tmp_path / "params.npz", W_enc=np.array([{"a": 1}], dtype=object))
    with pytest.raises(SAELoadError, match="Python objects"):
        emjax.sae.load(tmp_path)


# ---------------------------------------------------------------------------- sparsify


def test_sparsify_directory_matches_eai_sparsify(x, tmp_path):
    torch.manual_seed(4)
    oracle = sparsify.SparseCoder(D_IN, sparsify.SparseCoderConfig(num_latents=D_SAE, k=6))
    randomise_torch(oracle, seed=4)
    oracle.save_to_disk(tmp_path)
    sae = emjax.sae.load(tmp_path)
    assert isinstance(sae, TopKSAE) and sae.k == 6
    assert_top_k_is_clear(sae.pre_activations(x), sae.k)
    with torch.no_grad():
        top_acts, top_indices, _ = oracle.encode(torch.from_numpy(x))
        want = oracle.decode(top_acts, top_indices).numpy()
    np.testing.assert_allclose(sae.encode(x), dense(top_acts.numpy(), top_indices.numpy(), D_SAE), **TOL)
    np.testing.assert_allclose(sae(x), want, **TOL)


# ---------------------------------------------------------------------------- Llama Scope


def write_llama_scope(directory, seed, *, norm_in=7.5, norm_out=7.5, theta=0.9):
    g = torch.Generator().manual_seed(seed)
    tensors = {
        "encoder.weight": 0.5 * torch.randn(D_SAE, D_IN, generator=g),
        "encoder.bias": 0.5 * torch.randn(D_SAE, generator=g),
        "decoder.weight": 0.4 * torch.randn(D_IN, D_SAE, generator=g),
        "decoder.bias": 0.5 * torch.randn(D_IN, generator=g),
    }
    (directory / "checkpoints").mkdir(parents=True)
    save_file(tensors, directory / "checkpoints" / "final.safetensors")
    hyper = {
        "d_model": D_IN,
        "d_sae": D_SAE,
        "act_fn": "jumprelu",
        "jump_relu_threshold": theta,
        "norm_activation": "dataset-wise",
        "dataset_average_activation_norm": {"in": norm_in, "out": norm_out},
        "apply_decoder_bias_to_pre_encoder": False,
        "sparsity_include_decoder_norm": True,
        "use_decoder_bias": True,
        "hook_point_in": "blocks.3.hook_resid_post",
        "hook_point_out": "blocks.3.hook_resid_post",
    }
    (directory / "hyperparams.json").write_text(json.dumps(hyper))
    return {k: v.double().numpy() for k, v in tensors.items()}, hyper


def llama_scope_reference(t, hyper, x):
    """The authors' inference path: dataset norm folded into biases and decoder
    (standardize_parameters_of_dataset_norm), gate on hidden_pre * |decoder column|."""
    s_in = math.sqrt(D_IN) / hyper["dataset_average_activation_norm"]["in"]
    s_out = math.sqrt(D_IN) / hyper["dataset_average_activation_norm"]["out"]
    w_d = t["decoder.weight"] * s_in / s_out
    hidden_pre = x @ t["encoder.weight"].T + t["encoder.bias"] / s_in
    norms = np.linalg.norm(w_d, axis=0)
    scores = hidden_pre * norms
    f = hidden_pre * (scores > hyper["jump_relu_threshold"])
    return f, scores, norms, f @ w_d.T + t["decoder.bias"] / s_out


@pytest.mark.parametrize("norm_out", [7.5, 5.0])
def test_llama_scope_reference_gating(norm_out, x, tmp_path):
    t, hyper = write_llama_scope(tmp_path, seed=5, norm_out=norm_out)
    x = 3.0 * x
    f, scores, norms, want = llama_scope_reference(t, hyper, x.astype(np.float64))
    sae = emjax.sae.load(tmp_path)
    np.testing.assert_allclose(sae(x), want, **TOL)
    # The reference moves the decoder norms into the encoder: features come out times |decoder column|.
    keep = away_from(scores, hyper["jump_relu_threshold"])
    np.testing.assert_allclose(np.asarray(sae.encode(x))[keep], (f * norms)[keep], **TOL)
    np.testing.assert_allclose(np.linalg.norm(sae.W_dec[...], axis=1), 1.0, rtol=1e-5)


def test_llama_scope_sae_lens_gating(x, tmp_path, monkeypatch):
    t, hyper = write_llama_scope(tmp_path, seed=6, theta=0.4)
    x = 3.0 * x.astype(np.float64)
    s = math.sqrt(D_IN) / hyper["dataset_average_activation_norm"]["in"]
    # sae-lens's converter: W_enc^T scaled by s, gate on hidden_pre > theta * s (no decoder norm).
    h = x @ (t["encoder.weight"].T * s) + t["encoder.bias"]
    f = np.maximum(h, 0) * (h > hyper["jump_relu_threshold"] * s)
    want = f @ (t["decoder.weight"].T / s) + t["decoder.bias"] / s
    sae = emjax.sae.load(tmp_path, llama_scope_gating="sae_lens")
    keep = away_from(h, hyper["jump_relu_threshold"] * s)
    np.testing.assert_allclose(np.asarray(sae.encode(x))[keep], f[keep], **TOL)
    np.testing.assert_allclose(sae(x), want, **TOL)

    # and sae-lens's own converter, with the norm folding its from_pretrained applies
    files = {
        "hyperparams.json": tmp_path / "hyperparams.json",
        "final.safetensors": tmp_path / "checkpoints/final.safetensors",
    }
    monkeypatch.setattr(
        pretrained_loaders,
        "hf_hub_download",
        lambda *a, **kw: str(files[os.path.basename(kw.get("filename", a[-1] if a else ""))]),
    )
    cfg, state, _ = pretrained_loaders.llama_scope_sae_huggingface_loader(
        "fnlp/Llama3_1-8B-Base-LXR-8x", "Llama3_1-8B-Base-L3R-8x", cfg_overrides={"dtype": "float32"}
    )
    oracle = sae_lens.JumpReLUSAE(
        sae_lens.JumpReLUSAEConfig.from_dict(pretrained_loaders.handle_config_defaulting(cfg))
    )
    oracle.load_state_dict(state)
    oracle.fold_activation_norm_scaling_factor(s)
    with torch.no_grad():
        np.testing.assert_allclose(sae(x), oracle(torch.from_numpy(x).float()).numpy(), **TOL)


def test_llama_scope_gatings_differ(x, tmp_path):
    write_llama_scope(tmp_path, seed=7)
    reference = emjax.sae.load(tmp_path)
    compatible = emjax.sae.load(tmp_path, llama_scope_gating="sae_lens")
    assert ((np.asarray(reference.encode(3 * x)) > 0) != (np.asarray(compatible.encode(3 * x)) > 0)).any()


# ---------------------------------------------------------------------------- dictionary_learning


class BatchTopKLike(torch.nn.Module):
    """The parameters and buffers of dictionary_learning's BatchTopKSAE / AutoEncoderTopK."""

    def __init__(self, k, threshold):
        super().__init__()
        self.register_buffer("k", torch.tensor(k, dtype=torch.int))
        self.register_buffer("threshold", torch.tensor(threshold))
        self.decoder = torch.nn.Linear(D_SAE, D_IN, bias=False)
        self.encoder = torch.nn.Linear(D_IN, D_SAE)
        self.b_dec = torch.nn.Parameter(torch.zeros(D_IN))


class AutoEncoderLike(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.bias = torch.nn.Parameter(torch.zeros(D_IN))
        self.encoder = torch.nn.Linear(D_IN, D_SAE)
        self.decoder = torch.nn.Linear(D_SAE, D_IN, bias=False)


class JumpReluAutoEncoderLike(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.W_enc = torch.nn.Parameter(torch.zeros(D_IN, D_SAE))
        self.b_enc = torch.nn.Parameter(torch.zeros(D_SAE))
        self.W_dec = torch.nn.Parameter(torch.zeros(D_SAE, D_IN))
        self.b_dec = torch.nn.Parameter(torch.zeros(D_IN))
        self.threshold = torch.nn.Parameter(torch.zeros(D_SAE))


def write_dictionary_learning(directory, module, dict_class, k=None):
    torch.save(module.state_dict(), directory / "ae.pt")
    trainer = {"dict_class": dict_class, "activation_dim": D_IN, "dict_size": D_SAE, "layer": 3, "lm_name": "m"}
    if k is not None:
        trainer["k"] = k
    (directory / "config.json").write_text(json.dumps({"trainer": trainer, "buffer": {"ctx_len": 128}}))


def dictionary_learning_formula(m, dict_class, x):
    """dictionary_learning's encode / decode for each class, in torch."""
    with torch.no_grad():
        if dict_class == "BatchTopKSAE":
            post = torch.relu(m.encoder(x - m.b_dec))
            f = post * (post > m.threshold)
            return f, m.decoder(f) + m.b_dec
        if dict_class == "AutoEncoderTopK":
            post = torch.relu(m.encoder(x - m.b_dec))
            top = post.topk(int(m.k), sorted=False)
            f = torch.zeros_like(post).scatter_(-1, top.indices, top.values)
            return f, m.decoder(f) + m.b_dec
        if dict_class == "AutoEncoder":
            f = torch.relu(m.encoder(x - m.bias))
            return f, m.decoder(f) + m.bias
        pre = x @ m.W_enc + m.b_enc
        f = torch.relu(pre * (pre > m.threshold)) * m.W_dec.norm(dim=1)
        return f, (f / m.W_dec.norm(dim=1)) @ m.W_dec + m.b_dec


DICTIONARY_LEARNING_CASES = {
    "BatchTopKSAE": lambda: BatchTopKLike(k=8, threshold=0.35),
    "AutoEncoderTopK": lambda: BatchTopKLike(k=8, threshold=-1.0),
    "AutoEncoder": AutoEncoderLike,
    "JumpReluAutoEncoder": JumpReluAutoEncoderLike,
}


@pytest.mark.parametrize("dict_class", sorted(DICTIONARY_LEARNING_CASES))
def test_dictionary_learning_ae_pt_matches_its_formula(dict_class, x, tmp_path):
    module = randomise_torch(DICTIONARY_LEARNING_CASES[dict_class](), seed=8)
    write_dictionary_learning(tmp_path, module, dict_class, k=8)
    sae = emjax.sae.load(tmp_path)
    f, want = dictionary_learning_formula(module, dict_class, torch.from_numpy(x))
    f, want = f.numpy(), want.numpy()
    np.testing.assert_allclose(sae(x), want, **TOL)
    ours = np.asarray(sae.encode(x))
    if isinstance(sae, JumpReLUSAE):
        keep = away_from(np.asarray(sae.pre_activations(x)), np.asarray(sae.threshold[...]))
        np.testing.assert_allclose(ours[keep], f[keep], **TOL)
    else:
        if isinstance(sae, TopKSAE):
            assert_top_k_is_clear(sae.pre_activations(x), sae.k)
        np.testing.assert_allclose(ours, f, **TOL)
    if dict_class == "BatchTopKSAE":
        np.testing.assert_array_equal(sae.threshold[...], np.full(D_SAE, 0.35, np.float32))


class Payload:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_a_pickle_naming_anything_but_tensors_is_refused_and_nothing_runs(tmp_path):
    marker = tmp_path / "ran"
    state = collections.OrderedDict(W_enc=Payload(marker))
    with zipfile.ZipFile(tmp_path / "ae.pt", "w") as archive:
        archive.writestr("archive/data.pkl", pickle.dumps(state, protocol=2))
        archive.writestr("archive/byteorder", "little")
    trainer = {"dict_class": "BatchTopKSAE", "activation_dim": D_IN, "dict_size": D_SAE}
    (tmp_path / "config.json").write_text(json.dumps({"trainer": trainer}))
    with pytest.raises(UnsafePickleError, match=r"ae\.pt: refusing to load the pickle global (posix|os)\.system"):
        emjax.sae.load(tmp_path)
    assert not marker.exists()


# ---------------------------------------------------------------------------- clear errors


def test_wrong_shape_missing_tensor_and_d_model_are_named(tmp_path):
    oracle = randomise_torch(SAELENS_CASES["standard"](), seed=9)
    oracle.save_model(tmp_path)
    with pytest.raises(SAELoadError, match=r"the SAE reads d_in=16, but the model's d_model is 2304"):
        emjax.sae.load(tmp_path, d_model=2304)

    state = {k: v.clone() for k, v in oracle.state_dict().items()}
    state["W_dec"] = state["W_dec"][:, :-1].contiguous()
    save_file(state, tmp_path / "sae_weights.safetensors")
    with pytest.raises(
        SAELoadError, match=r"sae_weights\.safetensors: tensor 'W_dec' has shape \(48, 15\), expected \(48, 16\)"
    ):
        emjax.sae.load(tmp_path)

    del state["W_dec"]
    save_file(state, tmp_path / "sae_weights.safetensors")
    with pytest.raises(SAELoadError, match=r"sae_weights\.safetensors: tensor 'W_dec' is missing"):
        emjax.sae.load(tmp_path)

    (tmp_path / "empty").mkdir()
    with pytest.raises(SAELoadError, match="empty: not a recognised SAE"):
        emjax.sae.load(tmp_path / "empty")


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda cfg: cfg.pop("d_in"), r"cfg\.json: field 'd_in' is missing"),
        (lambda cfg: cfg.pop("d_sae"), r"cfg\.json: field 'd_sae' is missing"),
        (lambda cfg: cfg.update(d_in="wide"), r"cfg\.json: field 'd_in' must be int, got 'wide'"),
    ],
)
def test_a_saelens_config_without_a_required_field_is_named(edit, message, tmp_path):
    randomise_torch(SAELENS_CASES["standard"](), seed=9).save_model(tmp_path)
    cfg = json.loads((tmp_path / "cfg.json").read_text())
    edit(cfg)
    (tmp_path / "cfg.json").write_text(json.dumps(cfg))
    with pytest.raises(SAELoadError, match=message):
        emjax.sae.load(tmp_path)
