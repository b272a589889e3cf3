"""LoRA adapters against transformers + peft: export, import, merge, bad adapters."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

import emjax.models
from emjax import lora
from emjax.config import LoRAConfig
from hf_oracle import LLAMA3_ROPE, assert_close, random_gemma2, random_gpt_oss, random_llama

ALL = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
peft = pytest.importorskip("peft")


def _randomize_adapters(model, seed=0, std=0.3):
    """Non-zero A and B everywhere, so every factor and its layout matter."""
    rng = np.random.RandomState(seed)
    for _, adapter in lora.adapters(model):
        for var in (adapter.a, adapter.b):
            var.set_value(jnp.asarray(rng.normal(0, std, var.shape), jnp.float32))


def _peft_logits(hf_model, adapter_dir, ids):
    wrapped = peft.PeftModel.from_pretrained(hf_model, adapter_dir).eval()
    with torch.no_grad():
        return wrapped(torch.as_tensor(ids)).logits.numpy()


CASES = {
    "gemma2-all": (random_gemma2, {}, LoRAConfig(rank=4, alpha=8, targets=ALL)),
    "gemma2-rslora-some-layers": (
        random_gemma2, {}, LoRAConfig(rank=3, alpha=5, rslora=True, targets=("q_proj", "o_proj", "down_proj"),
                                      layers=(0, 2)),
    ),
    "llama-all": (random_llama, {"rope_scaling": LLAMA3_ROPE}, LoRAConfig(rank=4, alpha=16, targets=ALL)),
    "llama-attention-rslora": (
        random_llama, {}, LoRAConfig(rank=8, alpha=3, rslora=True, targets=("k_proj", "v_proj", "o_proj")),
    ),
    "gpt-oss-attention": (random_gpt_oss, {}, LoRAConfig(rank=4, alpha=8, targets=ALL[:4])),
}  # fmt: skip


@pytest.mark.parametrize("case", CASES)
@pytest.mark.slow
def test_exported_adapter_matches_peft(tmp_path, case):
    make, overrides, config = CASES[case]
    hf, path = make(tmp_path, **overrides)
    model = emjax.models.load(path, dtype="float32")
    lora.attach(model, config, seed=1)
    _randomize_adapters(model)
    lora.save_peft(model, tmp_path / "adapter", config=config, base_model=str(path))
    written = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert written["r"] == config.rank and written["use_rslora"] == config.rslora
    ids = np.random.RandomState(0).randint(0, 90, (2, 11))
    ref = _peft_logits(hf, tmp_path / "adapter", ids)
    base = np.asarray(emjax.models.load(path, dtype="float32")(jnp.asarray(ids)).logits)
    assert np.abs(base - ref).max() > 1e-2 * np.abs(ref).max()  # the adapter changes the logits
    assert_close(model(jnp.asarray(ids)).logits, ref)


@pytest.mark.parametrize("make", [random_gemma2, random_llama], ids=["gemma2", "llama"])
def test_peft_adapter_imports(tmp_path, make):
    hf, path = make(tmp_path)
    peft_config = peft.LoraConfig(
        r=4, lora_alpha=12, target_modules=["q_proj", "v_proj", "o_proj", "up_proj", "down_proj"],
        layers_to_transform=[1, 2], init_lora_weights=False,  # random A and B
    )  # fmt: skip
    torch.manual_seed(3)
    wrapped = peft.get_peft_model(hf, peft_config).eval()
    wrapped.save_pretrained(tmp_path / "adapter")
    ids = np.random.RandomState(1).randint(0, 90, (2, 9))
    with torch.no_grad():
        ref = wrapped(torch.as_tensor(ids)).logits.numpy()
    model = lora.load_peft(emjax.models.load(path, dtype="float32"), tmp_path / "adapter")
    assert {name.rsplit(".", 1)[1] for name, _ in lora.adapters(model)} == set(peft_config.target_modules)
    assert {int(name.split(".")[2]) for name, _ in lora.adapters(model)} == {1, 2}
    assert_close(model(jnp.asarray(ids)).logits, ref)


def test_attach_keeps_outputs_and_merge_matches_peft_merge(tmp_path):
    hf, path = random_llama(tmp_path)
    model = emjax.models.load(path, dtype="float32")
    ids = jnp.asarray(np.random.RandomState(2).randint(0, 90, (1, 8)))
    before = np.asarray(model(ids).logits)
    config = LoRAConfig(rank=2, alpha=4, targets=ALL)
    lora.attach(model, config)
    np.testing.assert_array_equal(np.asarray(model(ids).logits), before)  # B starts at zero
    _randomize_adapters(model)
    lora.save_peft(model, tmp_path / "adapter", config=config)
    adapted = np.asarray(model(ids).logits)
    lora.merge(model)
    assert not list(lora.adapters(model))
    assert_close(model(ids).logits, adapted, rel=1e-5)
    merged_hf = peft.PeftModel.from_pretrained(hf, tmp_path / "adapter").merge_and_unload()
    with torch.no_grad():
        ref = merged_hf(torch.as_tensor(np.array(ids))).logits.numpy()
    assert_close(model(ids).logits, ref)


def test_lora_params_are_separate_from_base_params(tmp_path):
    _, path = random_gemma2(tmp_path)
    model = emjax.models.load(path, dtype="float32")
    base = jax.tree.leaves(nnx_state(model, "base"))
    lora.attach(model, LoRAConfig(rank=4, alpha=8, targets=("q_proj", "up_proj")))
    assert len(jax.tree.leaves(nnx_state(model, "base"))) == len(base)
    factors = jax.tree.leaves(nnx_state(model, "lora"))
    layers = model.config.num_layers
    assert len(list(lora.adapters(model))) == 2 * layers  # per layer as PEFT names them, stacked as the blocks are
    assert len(factors) == 2 * 2 * model.blocks.period
    assert sum(f.size for f in factors) == layers * 4 * ((32 + 4 * 8) + (32 + 48))


def nnx_state(model, which):
    from flax import nnx

    return nnx.state(model, nnx.Param if which == "base" else lora.LoRAParam)


def test_bad_adapters_are_refused(tmp_path):
    _, path = random_gemma2(tmp_path)
    model = emjax.models.load(path, dtype="float32")
    lora.attach(model, LoRAConfig(rank=2, alpha=2, targets=("q_proj",)))
    lora.save_peft(model, tmp_path / "good")
    lora.remove(model)

    bad = tmp_path / "dora"
    bad.mkdir()
    config = json.loads((tmp_path / "good" / "adapter_config.json").read_text())
    (bad / "adapter_config.json").write_text(json.dumps(config | {"use_dora": True}))
    with pytest.raises(ValueError, match=r"dora.*adapter_config.json|adapter_config.json.*use_dora"):
        lora.load_peft(model, bad)

    wrong_rank = tmp_path / "rank"
    wrong_rank.mkdir()
    (wrong_rank / "adapter_config.json").write_text(json.dumps(config | {"r": 3}))
    weights = (tmp_path / "good" / "adapter_model.safetensors").read_bytes()
    (wrong_rank / "adapter_model.safetensors").write_bytes(weights)
    with pytest.raises(ValueError, match=r"lora_A.weight has shape \(2, 32\), the model needs \(3, 32\)"):
        lora.load_peft(model, wrong_rank)
    assert not list(lora.adapters(model))  # a failed load leaves no half-attached adapter

    with pytest.raises(ValueError, match="gpt-oss experts"):
        _, oss_path = random_gpt_oss(tmp_path)
        lora.attach(emjax.models.load(oss_path, dtype="float32"), LoRAConfig(targets=("gate_proj",)))
    with pytest.raises(ValueError, match=r"unknown modules \['qproj'\]"):
        lora.attach(model, LoRAConfig(targets=("qproj",)))
    with pytest.raises(ValueError, match=r"lora.layers \[7\] are outside 0..2"):
        lora.attach(model, LoRAConfig(layers=(7,)))


def test_a_broken_adapter_config_is_named(tmp_path):
    (tmp_path / "adapter_config.json").write_text("{oops")
    with pytest.raises(ValueError, match=r"adapter_config\.json: invalid JSON"):
        lora.read_peft_config(tmp_path)
