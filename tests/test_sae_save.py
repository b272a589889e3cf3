"""emjax.sae.save writes the SAELens format: it round-trips and sae-lens opens it."""

import json

import numpy as np
import pytest
import torch
from flax import nnx

import emjax.sae
from emjax.sae import BatchTopKSAE, JumpReLUSAE, ReLUSAE, TopKSAE

sae_lens = pytest.importorskip("sae_lens")

D_IN, D_SAE = 16, 48

BUILDERS = {
    "relu": lambda **kw: ReLUSAE(D_IN, D_SAE, rngs=nnx.Rngs(0), **kw),
    "jumprelu": lambda **kw: JumpReLUSAE(D_IN, D_SAE, rngs=nnx.Rngs(0), apply_b_dec_to_input=False, **kw),
    "topk": lambda **kw: TopKSAE(D_IN, D_SAE, rngs=nnx.Rngs(0), k=5, **kw),
    "batchtopk": lambda **kw: BatchTopKSAE(D_IN, D_SAE, rngs=nnx.Rngs(0), k=5, **kw),
}


def randomised(kind, seed, **kwargs):
    sae = BUILDERS[kind](**kwargs)
    rng = np.random.default_rng(seed)
    for name, value in nnx.to_pure_dict(nnx.state(sae)).items():
        getattr(sae, name).set_value(rng.normal(scale=0.5, size=value.shape).astype(np.float32))
    if isinstance(sae, JumpReLUSAE):
        sae.threshold.set_value(np.full(D_SAE, 0.3, np.float32) if kind == "batchtopk" else rng.uniform(0, 0.6, D_SAE))
    return sae


@pytest.mark.parametrize("scale", [1.0, 0.25])
@pytest.mark.parametrize("kind", sorted(BUILDERS))
def test_save_load_round_trip_and_sae_lens_opens_it(kind, scale, tmp_path):
    sae = randomised(kind, seed=1, input_scale=scale)
    x = np.random.default_rng(2).normal(size=(24, D_IN)).astype(np.float32) * 4
    emjax.sae.save(sae, tmp_path, metadata={"model_name": "tiny", "hook_name": "blocks.1.hook_resid_post"})

    loaded = emjax.sae.load(tmp_path)
    expected_type = JumpReLUSAE if kind == "batchtopk" else type(sae)
    assert type(loaded) is expected_type and loaded.input_scale == 1.0
    np.testing.assert_allclose(loaded.encode(x), sae.encode(x), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(loaded(x), sae(x), rtol=1e-5, atol=1e-5)

    oracle = sae_lens.SAE.load_from_disk(tmp_path)
    assert json.loads((tmp_path / "cfg.json").read_text())["metadata"]["hook_name"] == "blocks.1.hook_resid_post"
    with torch.no_grad():
        np.testing.assert_allclose(oracle.encode(torch.from_numpy(x)).numpy(), sae.encode(x), rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(oracle(torch.from_numpy(x)).numpy(), sae(x), rtol=1e-5, atol=1e-5)
