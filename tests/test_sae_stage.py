"""The sae stage's library pieces: quality numbers against numpy, the token budget, one seed per layer, the tokens
kept."""

import typing

import numpy as np
import pytest
from flax import nnx

import emjax.sae
from emjax import config as config_lib
from emjax import extract
from emjax.sae import TopKSAE
from emjax.sae import model as sae_model
from emjax.sae.quality import quality
from emjax.sae.train import layer_seed, token_budget_error


def test_quality_matches_numpy_and_a_high_norm_token_cannot_carry_the_fvu():
    rng = np.random.default_rng(0)
    sae = TopKSAE(16, 64, rngs=nnx.Rngs(0), k=4)
    x = rng.normal(size=(300, 16)).astype(np.float32)
    x[0] *= 200.0  # one massive-activation token (as position 0 of many models)
    q = quality(sae, x, batch=128)
    codes = np.asarray(sae.encode(x), np.float64)
    err = ((np.asarray(sae.decode(codes.astype(np.float32)), np.float64) - x) ** 2).sum(1)
    spread = ((x - x.astype(np.float64).mean(0)) ** 2).sum(1)
    assert q["fvu"] == pytest.approx(err.sum() / spread.sum(), rel=1e-5)
    assert q["fvu_per_token_mean"] == pytest.approx(np.mean(err / spread), rel=1e-5)
    assert q["fvu_per_token_median"] == pytest.approx(np.median(err / spread), rel=1e-5)
    assert q["l0"] == pytest.approx((codes > 0).sum() / len(x)) and q["tokens"] == 300


@pytest.mark.parametrize("name", typing.get_args(typing.get_type_hints(config_lib.SAEConfig)["architecture"]))
def test_every_configured_architecture_is_built_by_the_table_and_loads_back_as_saved(name, tmp_path):
    assert set(typing.get_args(typing.get_type_hints(config_lib.SAEConfig)["architecture"])) == set(
        sae_model.ARCHITECTURES
    )
    sae = sae_model.create(name, 8, 24, k=3, rngs=nnx.Rngs(0))
    assert type(sae) is sae_model.ARCHITECTURES[name] and getattr(sae, "k", 3) == 3
    sae.b_enc.set_value(np.random.default_rng(1).normal(size=24).astype(np.float32))
    emjax.sae.save(sae, tmp_path / "sae")
    loaded = emjax.sae.load(tmp_path / "sae")
    # A BatchTopK SAE is used and saved as a JumpReLU one; every other comes back as itself.
    assert type(loaded) is (sae_model.JumpReLUSAE if name == "batchtopk" else type(sae))
    x = np.random.default_rng(2).normal(size=(5, 8)).astype(np.float32)
    np.testing.assert_allclose(np.asarray(loaded.encode(x)), np.asarray(sae.encode(x)), rtol=1e-6, atol=1e-7)


def test_token_budget_names_what_is_needed():
    assert token_budget_error(230_400, 4608, 50) is None
    assert token_budget_error(27_000, 4608, 50) == (
        "27,000 training tokens for 4,608 latents (5.9 per latent) < sae.tokens_per_latent=50: about 230,400 tokens "
        "are needed"
    )


def test_each_layer_has_its_own_seed_and_the_same_run_the_same():
    seeds = [layer_seed(0, layer) for layer in (6, 12)]
    assert seeds[0] != seeds[1] and seeds == [layer_seed(0, layer) for layer in (6, 12)]
    assert layer_seed(1, 6) != seeds[0]


def test_text_tokens_leave_out_position_zero_and_bos():
    tokens = np.array([[2, 5, 6, 2, 7, 0], [9, 2, 4, 0, 0, 0]])
    mask = np.array([[1, 1, 1, 1, 1, 0], [1, 1, 1, 0, 0, 0]])
    expected = np.array([[0, 1, 1, 0, 1, 0], [0, 0, 1, 0, 0, 0]])
    np.testing.assert_array_equal(extract.text_tokens(tokens, mask, bos_id=2), expected)
    np.testing.assert_array_equal(extract.text_tokens(tokens, mask, bos_id=None)[1], [0, 1, 1, 0, 0, 0])
