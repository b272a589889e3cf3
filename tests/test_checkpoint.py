"""Reading and writing Hugging Face checkpoints."""

import json
import shutil

import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

import emjax.models
from emjax.models.checkpoint import CheckpointError, HFTensor, SafetensorsFile, write_safetensors
from hf_oracle import random_gemma2, reference


def test_reader_matches_safetensors_on_every_dtype(tmp_path):
    tensors = {
        "bf16": torch.randn(5, 7).bfloat16(),
        "f32": torch.randn(3, 2, 4),
        "f16": torch.randn(6).half(),
        "i64": torch.arange(12).reshape(3, 4),
        "empty": torch.zeros(0, 3),
    }
    save_file(tensors, tmp_path / "t.safetensors")
    f = SafetensorsFile(tmp_path / "t.safetensors")
    for key, ref in tensors.items():
        ours = np.asarray(f.array(key))
        assert ours.shape == tuple(ref.shape)
        np.testing.assert_array_equal(ours.astype(np.float64), ref.double().numpy(), err_msg=key)
    np.testing.assert_array_equal(
        np.asarray(f.array("bf16")[1:3, 2:5]).astype(np.float32), tensors["bf16"][1:3, 2:5].float().numpy()
    )


def test_writer_output_opens_in_safetensors(tmp_path):
    rng = np.random.RandomState(0)
    arrays = {"a": rng.randn(4, 3).astype(ml_dtypes.bfloat16), "b": rng.randn(5).astype(np.float32)}
    write_safetensors(tmp_path / "w.safetensors", arrays, metadata={"format": "pt"})
    loaded = load_file(tmp_path / "w.safetensors")
    assert loaded["a"].dtype == torch.bfloat16
    np.testing.assert_array_equal(loaded["a"].float().numpy(), arrays["a"].astype(np.float32))
    np.testing.assert_array_equal(loaded["b"].numpy(), arrays["b"])


@pytest.mark.parametrize(
    "spec, hf_shape",
    [
        (HFTensor("q", split=((4, 8), (32,)), perm=(2, 0, 1)), (32, 32)),  # q_proj [h*k, d] -> [d, h, k]
        (HFTensor("o", split=((32,), (4, 8)), perm=(1, 2, 0)), (32, 32)),  # o_proj [d, h*k] -> [h, k, d]
        (HFTensor("w", perm=(1, 0)), (12, 10)),
        (HFTensor("n"), (16,)),
    ],
)
def test_shard_reads_equal_slices_of_the_whole_tensor(spec, hf_shape):
    rng = np.random.RandomState(0)
    source = rng.randn(*hf_shape).astype(np.float32)
    groups = spec.split or tuple((n,) for n in hf_shape)
    whole = source.reshape([n for g in groups for n in g])
    whole = whole.transpose(spec.perm) if spec.perm else whole
    assert spec.our_shape(hf_shape) == whole.shape
    for _ in range(20):
        index = []
        for n in whole.shape:
            lo = rng.randint(0, n)
            index.append(slice(lo, rng.randint(lo + 1, n + 1)))
        np.testing.assert_array_equal(spec.read(source, tuple(index)), whole[tuple(index)])
    np.testing.assert_array_equal(spec.write(whole), source)


def test_saved_model_opens_in_transformers(tmp_path):
    from transformers import Gemma2ForCausalLM

    _, path = random_gemma2(tmp_path)
    model = emjax.models.load(path, dtype="float32")
    emjax.models.save(model, tmp_path / "saved")
    reopened = Gemma2ForCausalLM.from_pretrained(tmp_path / "saved", attn_implementation="eager").eval()
    ids = np.random.RandomState(0).randint(0, 97, (2, 9))
    np.testing.assert_allclose(
        np.asarray(model(jnp.asarray(ids)).logits), reference(reopened, ids)[0], rtol=1e-5, atol=1e-5
    )


@pytest.mark.slow
def test_bfloat16_load(tmp_path):
    hf, path = random_gemma2(tmp_path)
    model = emjax.models.load(path, dtype="bfloat16")
    assert model.blocks[0].attn.q[...].dtype == jnp.bfloat16
    ids = np.random.RandomState(0).randint(0, 97, (1, 8))
    ref = reference(hf, ids)[0]
    err = np.abs(np.asarray(model(jnp.asarray(ids)).logits) - ref).max()
    assert err < 0.1 * np.abs(ref).max()


@pytest.fixture
def checkpoint(tmp_path):
    _, path = random_gemma2(tmp_path, max_shard_size="40KB")
    return path


def test_missing_directory_and_config(tmp_path, checkpoint):
    with pytest.raises(CheckpointError, match="does not exist"):
        emjax.models.load(tmp_path / "nowhere")
    (checkpoint / "config.json").unlink()
    with pytest.raises(CheckpointError, match="config.json is missing"):
        emjax.models.load(checkpoint)


def test_pickled_weights_are_not_read(tmp_path, checkpoint):
    target = tmp_path / "bin"
    target.mkdir()
    shutil.copy(checkpoint / "config.json", target)
    (target / "pytorch_model.bin").write_bytes(b"not read")
    with pytest.raises(CheckpointError, match="safetensors only"):
        emjax.models.load(target)


def test_unknown_architecture(checkpoint):
    config = json.loads((checkpoint / "config.json").read_text())
    config["architectures"] = ["MambaForCausalLM"]
    (checkpoint / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="unknown architecture.*Mamba"):
        emjax.models.load(checkpoint)


def test_shape_that_does_not_match_the_config(checkpoint):
    config = json.loads((checkpoint / "config.json").read_text())
    config["intermediate_size"] = 64
    (checkpoint / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match=r"mlp\.\w+_proj\.weight' has shape.*config.json implies"):
        emjax.models.load(checkpoint)


def test_missing_shard_file(checkpoint):
    index = json.loads((checkpoint / "model.safetensors.index.json").read_text())
    victim = sorted(set(index["weight_map"].values()))[-1]
    (checkpoint / victim).unlink()
    with pytest.raises(CheckpointError, match=f"{victim}.*missing"):
        emjax.models.load(checkpoint)


def test_missing_tensor(checkpoint):
    index_path = checkpoint / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    del index["weight_map"]["model.layers.1.mlp.up_proj.weight"]
    index_path.write_text(json.dumps(index))
    # The tensor is still inside its file, so drop that file's other listing too.
    for f in checkpoint.glob("*.safetensors"):
        tensors = load_file(f)
        if "model.layers.1.mlp.up_proj.weight" in tensors:
            del tensors["model.layers.1.mlp.up_proj.weight"]
            save_file(tensors, f, metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match="model.layers.1.mlp.up_proj.weight.*not found"):
        emjax.models.load(checkpoint)


# ---------------------------------------------------------------------------- truncated and inconsistent files


def write_small_file(path):
    tensors = {"a": torch.randn(8, 4), "b": torch.arange(10)}
    save_file(tensors, path)
    return tensors


def test_a_truncated_file_is_refused_on_open_naming_the_tensor(tmp_path):
    path = tmp_path / "t.safetensors"
    write_small_file(path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2 + 60])  # the header survives, the last tensor's bytes do not
    with pytest.raises(CheckpointError, match=r"t\.safetensors: tensor '(a|b)' lies at bytes .* holds only"):
        SafetensorsFile(path)


def test_a_header_length_beyond_the_file_is_refused(tmp_path):
    path = tmp_path / "t.safetensors"
    write_small_file(path)
    data = path.read_bytes()
    path.write_bytes((2**60).to_bytes(8, "little") + data[8:])
    with pytest.raises(CheckpointError, match=rf"t\.safetensors: a header of {2**60} bytes does not fit"):
        SafetensorsFile(path)
    path.write_bytes(data[:5])
    with pytest.raises(CheckpointError, match=r"t\.safetensors: .* does not fit in a file of 5 bytes"):
        SafetensorsFile(path)


def test_offsets_that_disagree_with_dtype_and_shape_are_refused(tmp_path):
    path = tmp_path / "t.safetensors"
    write_small_file(path)
    data = path.read_bytes()
    header_len = int.from_bytes(data[:8], "little")
    header = data[8 : 8 + header_len].replace(b'"shape":[8,4]', b'"shape":[8,5]')
    path.write_bytes(data[:8] + header + data[8 + header_len :])
    with pytest.raises(CheckpointError, match=r"tensor 'a' of dtype F32 and shape \(8, 5\) needs 160 bytes"):
        SafetensorsFile(path)


def test_a_valid_file_still_loads_after_the_checks(tmp_path):
    path = tmp_path / "t.safetensors"
    tensors = write_small_file(path)
    f = SafetensorsFile(path)
    for key, ref in tensors.items():
        np.testing.assert_array_equal(np.asarray(f.array(key)), ref.numpy())


def test_a_truncated_shard_is_refused_by_load_naming_file_and_tensor(checkpoint):
    victim = sorted(checkpoint.glob("*.safetensors"))[0]
    data = victim.read_bytes()
    victim.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=rf"{victim.name}: tensor '.*' lies at bytes"):
        emjax.models.load(checkpoint)


def test_tokenizer_errors_say_what_is_missing(tmp_path, checkpoint):
    with pytest.raises(CheckpointError, match=r"directory .*nowhere does not exist \(the tokenizer is read from it\)"):
        emjax.models.load_tokenizer(tmp_path / "nowhere")
    for name in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model"):
        (checkpoint / name).unlink(missing_ok=True)
    with pytest.raises(CheckpointError, match=rf"{checkpoint.name} holds no tokenizer \(none of tokenizer\.json"):
        emjax.models.load_tokenizer(checkpoint)
    (checkpoint / "tokenizer.json").write_text("{not json")
    with pytest.raises(CheckpointError, match=r"tokenizer cannot be loaded"):
        emjax.models.load_tokenizer(checkpoint)


def test_broken_index_config_and_missing_fields_are_named(checkpoint):
    index_path = checkpoint / "model.safetensors.index.json"
    index = index_path.read_text()
    index_path.write_text("{not json")
    with pytest.raises(CheckpointError, match=r"model\.safetensors\.index\.json: not a safetensors index"):
        emjax.models.load(checkpoint)
    index_path.write_text(index)
    config = json.loads((checkpoint / "config.json").read_text())
    (checkpoint / "config.json").write_text("[1, 2]")
    with pytest.raises(CheckpointError, match=r"config\.json: expected a JSON object, got list"):
        emjax.models.load(checkpoint)
    del config["num_attention_heads"]
    (checkpoint / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match=r"config\.json: required field 'num_attention_heads' is missing"):
        emjax.models.load(checkpoint)
