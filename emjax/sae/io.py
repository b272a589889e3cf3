"""Public SAE releases -> the canonical layout of emjax.sae.model, and SAELens-format export.

`load(path)` recognises:

- Gemma Scope: params.npz (W_enc, W_dec, b_enc, b_dec, threshold); JumpReLU on
  the raw residual stream, no b_dec subtraction.
- SAELens: cfg.json + sae_weights.safetensors (standard, jumprelu, topk).
- sparsify: cfg.json + sae.safetensors; encoder.weight is [d_sae, d_in], W_dec
  is stored as [d_sae, d_in], b_dec is subtracted, top-k of relu(pre).
- Llama Scope: hyperparams.json + checkpoints/final.safetensors (nn.Linear
  layouts, one scalar JumpReLU threshold, a dataset-level input norm).
- dictionary_learning: config.json + ae.pt, read by a restricted unpickler.

Tensors are memory-mapped (or, for npz members, read one at a time) and each
device reads only its own shard, so a large SAE never sits twice in host memory.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import zipfile
from collections.abc import Mapping
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh, SingleDeviceSharding

from emjax import artifacts, distributed
from emjax.artifacts import write_safetensors
from emjax.config import ConfigError
from emjax.distributed import DEFAULT_RULES
from emjax.models.checkpoint import SafetensorsFile
from emjax.sae import unpickle
from emjax.sae.model import SAE, SAELENS_ARCHITECTURES, saelens_module

_log = logging.getLogger(__name__)

# The SAELens config schema we write (sae-lens reads configs older than 6.0 through a converter).
SAELENS_SCHEMA_VERSION = "6.0.0"
LLAMA_SCOPE_GATING = ("reference", "sae_lens")


class SAELoadError(ValueError):
    """An SAE file or directory that cannot be read as the format it claims."""


@dataclasses.dataclass
class Release:
    """What a format reader found, already in the canonical layout (arrays may be lazy views)."""

    source: Path
    architecture: str
    arrays: dict[str, object]
    apply_b_dec_to_input: bool
    k: int | None = None


# ---------------------------------------------------------------------------- reading files


class _NpzMember:
    """One array of an .npz archive: memory-mapped when stored uncompressed, else
    decompressed on first access (never through pickle)."""

    def __init__(self, path: Path, info: zipfile.ZipInfo):
        self.path, self.info = path, info
        with zipfile.ZipFile(path) as archive, archive.open(info) as f:
            version = np.lib.format.read_magic(f)
            if version not in ((1, 0), (2, 0)):
                raise SAELoadError(f"{path}: member {info.filename!r} has unsupported .npy version {version}")
            read_header = (
                np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
            )
            shape, fortran, dtype = read_header(f)
            header_len = f.tell()
        if dtype.hasobject:
            raise SAELoadError(f"{path}: member {info.filename!r} holds Python objects; refusing to unpickle it")
        self.shape, self.dtype, self.fortran, self.header_len = tuple(shape), dtype, fortran, header_len
        self._array = None

    def _load(self) -> np.ndarray:
        if self._array is None:
            if self.info.compress_type == zipfile.ZIP_STORED:
                with open(self.path, "rb") as f:  # the local header's extra field may differ from the central one
                    f.seek(self.info.header_offset + 26)
                    name_len, extra_len = np.frombuffer(f.read(4), "<u2")
                offset = self.info.header_offset + 30 + int(name_len) + int(extra_len) + self.header_len
                order = "F" if self.fortran else "C"
                self._array = np.memmap(self.path, self.dtype, "r", offset=offset, shape=self.shape, order=order)
            else:
                with zipfile.ZipFile(self.path) as archive, archive.open(self.info) as f:
                    self._array = np.lib.format.read_array(f, allow_pickle=False)
        return self._array

    def __getitem__(self, index):
        return self._load()[index]

    def __array__(self, dtype=None, copy=None):
        return np.asarray(self._load(), dtype)


def read_npz(path: Path) -> dict[str, _NpzMember]:
    """Lazy arrays of an .npz file by name; nothing is inflated until read."""
    try:
        with zipfile.ZipFile(path) as archive:
            infos = [i for i in archive.infolist() if i.filename.endswith(".npy")]
    except (OSError, zipfile.BadZipFile) as e:
        raise SAELoadError(f"{path}: not a readable .npz archive ({e})") from e
    return {i.filename[: -len(".npy")]: _NpzMember(path, i) for i in infos}


def _safetensors(path: Path) -> dict[str, np.ndarray]:
    if not path.is_file():
        raise SAELoadError(f"{path} is missing")
    f = SafetensorsFile(path)
    return {key: f.array(key) for key in f.tensors}


def _json(path: Path) -> dict:
    if not path.is_file():
        raise SAELoadError(f"{path} is missing")
    try:
        return json.loads(path.read_text())
    except ValueError as e:
        raise SAELoadError(f"{path}: invalid JSON ({e})") from e


def _field(cfg: Mapping, name: str, source: Path, kind=int):
    """cfg[name] as `kind`, or an error naming the file and the field."""
    if name not in cfg or cfg[name] is None:
        raise SAELoadError(f"{source}: field {name!r} is missing")
    try:
        return kind(cfg[name])
    except (TypeError, ValueError):
        raise SAELoadError(f"{source}: field {name!r} must be {kind.__name__}, got {cfg[name]!r}") from None


def _tensor(tensors: Mapping, name: str, shape: tuple[int, ...], source: Path, *, alias: tuple[str, ...] = ()):
    """tensors[name] (or the first alias present), checked against the expected shape."""
    found = next((n for n in (name, *alias) if n in tensors), None)
    if found is None:
        raise SAELoadError(f"{source}: tensor {name!r} is missing (the file holds {sorted(tensors)})")
    array = tensors[found]
    if tuple(array.shape) != tuple(shape):
        raise SAELoadError(f"{source}: tensor {found!r} has shape {tuple(array.shape)}, expected {tuple(shape)}")
    return array


def _f64(array) -> np.ndarray:
    return np.asarray(array, np.float64)


# ---------------------------------------------------------------------------- formats


def _gemma_scope(path: Path) -> Release:
    tensors = read_npz(path)
    tensors |= {"W_" + k[2:]: v for k, v in tensors.items() if k.startswith("w_")}
    if "W_enc" not in tensors:
        raise SAELoadError(f"{path}: tensor 'W_enc' is missing (the file holds {sorted(tensors)})")
    d_in, d_sae = tensors["W_enc"].shape
    arrays = {
        "W_enc": _tensor(tensors, "W_enc", (d_in, d_sae), path),
        "W_dec": _tensor(tensors, "W_dec", (d_sae, d_in), path),
        "b_enc": _tensor(tensors, "b_enc", (d_sae,), path),
        "b_dec": _tensor(tensors, "b_dec", (d_in,), path),
        "threshold": _tensor(tensors, "threshold", (d_sae,), path),
    }
    return Release(path, "jumprelu", arrays, apply_b_dec_to_input=False)


def _saelens(directory: Path) -> Release:
    cfg_path, weights = directory / "cfg.json", directory / "sae_weights.safetensors"
    cfg = _json(cfg_path)
    architecture = cfg.get("architecture")
    k = cfg.get("k")
    if architecture is None:  # configs written before sae-lens 6
        activation = cfg.get("activation_fn", cfg.get("activation_fn_str", "relu"))
        architecture = "topk" if activation == "topk" else "standard"
        k = (cfg.get("activation_fn_kwargs") or {}).get("k", k)
    if architecture not in SAELENS_ARCHITECTURES:
        raise SAELoadError(
            f"{cfg_path}: SAELens architecture {architecture!r} is not supported ({', '.join(SAELENS_ARCHITECTURES)})"
        )
    normalize = cfg.get("normalize_activations") or "none"
    if normalize == "expected_average_only_in":
        _log.warning(
            "%s: normalize_activations=%s but no scaling factor is stored; reading raw inputs, as sae-lens does",
            cfg_path,
            normalize,
        )
    elif normalize not in ("none", False):
        raise SAELoadError(f"{cfg_path}: normalize_activations={normalize!r} is not supported")
    tensors = _safetensors(weights)
    d_in, d_sae = _field(cfg, "d_in", cfg_path), _field(cfg, "d_sae", cfg_path)
    scaling = tensors.get("scaling_factor", tensors.get("finetuning_scaling_factor"))
    if scaling is not None and not np.allclose(scaling, 1.0):
        raise SAELoadError(f"{weights}: a finetuning scaling factor other than 1 is not supported")
    arrays = {
        "W_enc": _tensor(tensors, "W_enc", (d_in, d_sae), weights),
        "W_dec": _tensor(tensors, "W_dec", (d_sae, d_in), weights),
        "b_enc": _tensor(tensors, "b_enc", (d_sae,), weights),
        "b_dec": _tensor(tensors, "b_dec", (d_in,), weights),
    }
    if architecture == "jumprelu":
        arrays["threshold"] = _tensor(tensors, "threshold", (d_sae,), weights)
    if architecture == "topk":
        if k is None:
            raise SAELoadError(f"{cfg_path}: a topk SAE needs k")
        if cfg.get("rescale_acts_by_decoder_norm"):
            # top-k of h * |W_dec row|, decoded as f / |W_dec row|: fold the norms into the encoder.
            norms = np.linalg.norm(_f64(arrays["W_dec"]), axis=1)
            arrays["W_enc"] = _f64(arrays["W_enc"]) * norms
            arrays["b_enc"] = _f64(arrays["b_enc"]) * norms
            arrays["W_dec"] = _f64(arrays["W_dec"]) / norms[:, None]
    return Release(weights, architecture, arrays, bool(cfg.get("apply_b_dec_to_input", True)), k)


def _sparsify(directory: Path) -> Release:
    cfg_path, weights = directory / "cfg.json", directory / "sae.safetensors"
    cfg = _json(cfg_path)
    for key in ("transcode", "skip_connection"):
        if cfg.get(key):
            raise SAELoadError(f"{cfg_path}: sparsify {key}=true is not supported (an SAE only)")
    if cfg.get("activation", "topk") != "topk":
        raise SAELoadError(f"{cfg_path}: sparsify activation {cfg['activation']!r} is not supported (topk)")
    d_in = _field(cfg, "d_in", cfg_path)
    d_sae = int(cfg.get("num_latents") or d_in * _field(cfg, "expansion_factor", cfg_path))
    tensors = _safetensors(weights)
    arrays = {
        "W_enc": _tensor(tensors, "encoder.weight", (d_sae, d_in), weights).T,
        "W_dec": _tensor(tensors, "W_dec", (d_sae, d_in), weights),
        "b_enc": _tensor(tensors, "encoder.bias", (d_sae,), weights),
        "b_dec": _tensor(tensors, "b_dec", (d_in,), weights),
    }
    return Release(weights, "topk", arrays, apply_b_dec_to_input=True, k=_field(cfg, "k", cfg_path))


def _llama_scope(directory: Path, gating: str) -> Release:
    """Llama Scope (OpenMOSS lm_saes) JumpReLU SAEs, converted to raw-activation inputs.

    Training saw x * s with s = sqrt(d_model) / dataset_average_activation_norm.
    gating="reference" follows the authors' inference path: fold s into the
    biases and decoder, gate on hidden_pre * |decoder column| > threshold, and
    move the decoder norms into the encoder (unit decoder rows).
    gating="sae_lens" reproduces sae-lens's converter, which gates on
    hidden_pre > threshold without the decoder norm.
    """
    if gating not in LLAMA_SCOPE_GATING:
        raise ValueError(f"llama_scope_gating must be one of {LLAMA_SCOPE_GATING}, got {gating!r}")
    cfg_path, weights = directory / "hyperparams.json", directory / "checkpoints" / "final.safetensors"
    cfg = _json(cfg_path)
    if cfg.get("act_fn", "jumprelu").lower() != "jumprelu":
        raise SAELoadError(f"{cfg_path}: act_fn {cfg['act_fn']!r} is not supported (jumprelu)")
    d_in = _field(cfg, "d_model", cfg_path)
    d_sae = int(cfg.get("d_sae") or d_in * _field(cfg, "expansion_factor", cfg_path))
    tensors = _safetensors(weights)
    w_e = _f64(_tensor(tensors, "encoder.weight", (d_sae, d_in), weights))
    b_e = _f64(_tensor(tensors, "encoder.bias", (d_sae,), weights))
    w_d = _f64(_tensor(tensors, "decoder.weight", (d_in, d_sae), weights))
    b_d = (
        _f64(_tensor(tensors, "decoder.bias", (d_in,), weights))
        if cfg.get("use_decoder_bias", True)
        else np.zeros(d_in)
    )
    theta = _field(cfg, "jump_relu_threshold", cfg_path, float)
    s_in, s_out = _llama_scope_scales(cfg, cfg_path, d_in)
    if cfg.get("apply_decoder_bias_to_pre_encoder", False):
        b_e = b_e - w_e @ b_d  # (s x - b_dec) W^T + b_enc, with b_dec moved into the encoder bias

    if gating == "sae_lens":
        arrays = {
            "W_enc": w_e.T * s_in,
            "b_enc": b_e,
            "W_dec": w_d.T / s_in,
            "b_dec": b_d / s_in,
            "threshold": np.full(d_sae, theta * s_in),
        }
        return Release(weights, "jumprelu", arrays, apply_b_dec_to_input=False)

    w_d = w_d * (s_in / s_out)
    norms = np.linalg.norm(w_d, axis=0) if cfg.get("sparsity_include_decoder_norm", True) else np.ones(d_sae)
    arrays = {
        "W_enc": w_e.T * norms,
        "b_enc": b_e / s_in * norms,
        "W_dec": (w_d / norms).T,
        "b_dec": b_d / s_out,
        "threshold": np.full(d_sae, theta),
    }
    return Release(weights, "jumprelu", arrays, apply_b_dec_to_input=False)


def _llama_scope_scales(cfg: dict, cfg_path: Path, d_in: int) -> tuple[float, float]:
    mode = cfg.get("norm_activation", "dataset-wise")
    if mode == "inference":
        return 1.0, 1.0
    if mode != "dataset-wise":
        raise SAELoadError(f"{cfg_path}: norm_activation={mode!r} depends on each token and cannot be folded")
    norms = cfg.get("dataset_average_activation_norm") or {}
    inp = norms.get("in", norms.get(cfg.get("hook_point_in")))
    out = norms.get("out", norms.get(cfg.get("hook_point_out", cfg.get("hook_point_in"))))
    if inp is None or out is None:
        raise SAELoadError(f"{cfg_path}: dataset_average_activation_norm needs 'in' and 'out' entries, got {norms}")
    return math.sqrt(d_in) / float(inp), math.sqrt(d_in) / float(out)


def _dictionary_learning(directory: Path) -> Release:
    cfg_path, weights = directory / "config.json", directory / "ae.pt"
    trainer = _json(cfg_path).get("trainer", {})
    dict_class = trainer.get("dict_class")
    if not weights.is_file():
        raise SAELoadError(f"{weights} is missing")
    tensors = unpickle.load_state_dict(weights)
    d_in, d_sae = _field(trainer, "activation_dim", cfg_path), _field(trainer, "dict_size", cfg_path)
    if bool(np.asarray(tensors.get("normalize_to_sqrt_d", False))):
        raise SAELoadError(f"{weights}: normalize_to_sqrt_d scales each token and is not supported")

    def encoder():
        if "W_enc" in tensors:
            return _tensor(tensors, "W_enc", (d_in, d_sae), weights)
        return _tensor(tensors, "encoder.weight", (d_sae, d_in), weights).T

    def decoder():
        if "W_dec" in tensors:
            return _tensor(tensors, "W_dec", (d_sae, d_in), weights)
        return _tensor(tensors, "decoder.weight", (d_in, d_sae), weights).T

    arrays = {
        "W_enc": encoder(),
        "W_dec": decoder(),
        "b_enc": _tensor(tensors, "b_enc", (d_sae,), weights, alias=("encoder.bias",)),
        "b_dec": _tensor(tensors, "b_dec", (d_in,), weights, alias=("bias", "decoder_bias")),
    }
    if dict_class in ("BatchTopKSAE", "MatryoshkaBatchTopKSAE"):
        # Saved as JumpReLU: relu(h) * (relu(h) > t), one threshold t shared by all features.
        threshold = float(np.asarray(_tensor(tensors, "threshold", (), weights)))
        arrays["threshold"] = np.full(d_sae, threshold, np.float32)
        return Release(weights, "jumprelu", arrays, apply_b_dec_to_input=True)
    if dict_class == "AutoEncoderTopK":
        k = int(np.asarray(tensors["k"])) if "k" in tensors else _field(trainer, "k", cfg_path)
        return Release(weights, "topk", arrays, apply_b_dec_to_input=True, k=k)
    if dict_class == "AutoEncoder":
        return Release(weights, "standard", arrays, apply_b_dec_to_input=True)
    if dict_class == "JumpReluAutoEncoder":
        # Features are scaled by the decoder row norms n (and divided back on decode): fold n into the encoder.
        norms = np.linalg.norm(_f64(arrays["W_dec"]), axis=1)
        arrays["threshold"] = _f64(_tensor(tensors, "threshold", (d_sae,), weights)) * norms
        arrays["W_enc"] = _f64(arrays["W_enc"]) * norms
        arrays["b_enc"] = _f64(arrays["b_enc"]) * norms
        arrays["W_dec"] = _f64(arrays["W_dec"]) / norms[:, None]
        return Release(weights, "jumprelu", arrays, apply_b_dec_to_input=False)
    raise SAELoadError(
        f"{cfg_path}: dictionary_learning dict_class {dict_class!r} is not supported "
        "(BatchTopKSAE, MatryoshkaBatchTopKSAE, AutoEncoderTopK, AutoEncoder, JumpReluAutoEncoder)"
    )


def detect(path: str | os.PathLike) -> str:
    """The format of an SAE file or directory."""
    path = Path(path)
    if (path.is_file() and path.suffix == ".npz") or (path / "params.npz").is_file():
        return "gemma_scope"
    if (path / "cfg.json").is_file() and (path / "sae_weights.safetensors").is_file():
        return "saelens"
    if (path / "cfg.json").is_file() and (path / "sae.safetensors").is_file():
        return "sparsify"
    if (path / "hyperparams.json").is_file():
        return "llama_scope"
    if (path / "config.json").is_file() and (path / "ae.pt").is_file():
        return "dictionary_learning"
    if not path.exists():
        raise SAELoadError(f"{path} does not exist")
    raise SAELoadError(
        f"{path}: not a recognised SAE (looked for params.npz; cfg.json + sae_weights.safetensors; "
        "cfg.json + sae.safetensors; hyperparams.json + checkpoints/final.safetensors; config.json + ae.pt)"
    )


def read_release(path: str | os.PathLike, *, llama_scope_gating: str = "reference") -> Release:
    path = Path(path)
    fmt = detect(path)
    if fmt == "gemma_scope":
        return _gemma_scope(path if path.is_file() else path / "params.npz")
    if fmt == "llama_scope":
        return _llama_scope(path, llama_scope_gating)
    return {"saelens": _saelens, "sparsify": _sparsify, "dictionary_learning": _dictionary_learning}[fmt](path)


# ---------------------------------------------------------------------------- building the module


def load(
    path: str | os.PathLike,
    *,
    dtype=jnp.float32,
    mesh: Mesh | None = None,
    rules=None,
    d_model: int | None = None,
    llama_scope_gating: str = "reference",
) -> SAE:
    """An SAE from any supported release, each tensor read straight into its shards.

    `d_model`, when given, is the width of the activations the SAE will read; a
    different d_in is an error. `llama_scope_gating` is "reference" (the
    authors' decoder-norm gating) or "sae_lens" (sae-lens's converter).
    """
    release = read_release(path, llama_scope_gating=llama_scope_gating)
    d_in, d_sae = release.arrays["W_enc"].shape
    if d_model is not None and d_in != d_model:
        raise SAELoadError(f"{release.source}: the SAE reads d_in={d_in}, but the model's d_model is {d_model}")
    cls = saelens_module(release.architecture)
    kwargs = {"apply_b_dec_to_input": release.apply_b_dec_to_input}
    if release.k is not None:
        kwargs["k"] = int(release.k)
    abstract = nnx.eval_shape(lambda: cls(d_in, d_sae, rngs=nnx.Rngs(0), dtype=dtype, **kwargs))
    graphdef, state = nnx.split(abstract)
    rules = DEFAULT_RULES if rules is None else rules
    np_dtype = np.dtype(dtype)
    for path_, var in nnx.to_flat_state(state):
        name = path_[-1]
        source = release.arrays.pop(name)
        if mesh is None:
            sharding = SingleDeviceSharding(jax.devices()[0])
        else:
            axes = var.get_metadata()["logical_axes"]
            sharding = distributed.named_sharding(axes, var.shape, mesh, rules, what=f"SAE tensor {name!r}")
        var.set_value(
            jax.make_array_from_callback(
                var.shape, sharding, lambda index, source=source: np.asarray(source[index]).astype(np_dtype)
            )
        )
    return nnx.merge(graphdef, state)


# ---------------------------------------------------------------------------- SAELens export


def _host(array) -> np.ndarray:
    return distributed.gather_to_host(array[...] if isinstance(array, nnx.Variable) else array)


def saelens_tensors(sae: SAE) -> tuple[dict, dict[str, np.ndarray]]:
    """(cfg.json contents, tensors) of `sae` in the SAELens format, input scale folded in."""
    if getattr(sae, "architecture", None) not in SAELENS_ARCHITECTURES:
        raise TypeError(f"cannot export {type(sae).__name__} in the SAELens format")
    s = np.asarray(sae.input_scale, sae.dtype)
    folded = {"W_enc": lambda w: w * s, "W_dec": lambda w: w / s, "b_dec": lambda w: w / s}
    tensors = {}
    for path, var in nnx.to_flat_state(nnx.state(sae, nnx.Param)):
        name = path[-1]
        tensors[name] = folded.get(name, lambda w: w)(_host(var))
    cfg = {
        "architecture": sae.architecture,
        "d_in": sae.d_in,
        "d_sae": sae.d_sae,
        "dtype": np.dtype(sae.dtype).name,
        "device": "cpu",
        "apply_b_dec_to_input": bool(sae.apply_b_dec_to_input),
        "normalize_activations": "none",
        "reshape_activations": "none",
        "metadata": {"sae_lens_version": SAELENS_SCHEMA_VERSION, "sae_lens_training_version": SAELENS_SCHEMA_VERSION},
        **sae.saelens_fields(),
    }
    return cfg, tensors


def save(sae: SAE, path: str | os.PathLike, *, metadata: Mapping | None = None) -> None:
    """Write `sae` as a SAELens directory (cfg.json + sae_weights.safetensors).

    `metadata` (e.g. model_name, hook_name) goes into cfg.json's metadata.
    Every process must call this (sharded weights are gathered); process 0 writes.
    """
    cfg, tensors = saelens_tensors(sae)
    cfg["metadata"] |= dict(metadata or {})
    if not distributed.is_main_process():
        return
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    write_safetensors(path / "sae_weights.safetensors", tensors)
    artifacts.write_json(path / "cfg.json", cfg)


def release_path(s, layer: int) -> str | None:
    """The public SAE the `sae` config `s` names for `layer`: s.releases, else the suite named by s.releases_env
    (None: train one here, when s.train_missing)."""
    if str(layer) in s.releases:
        return s.releases[str(layer)]
    root = os.environ.get(s.releases_env) if s.releases_env else None
    if root and s.release_pattern:
        return s.release_pattern.format(root=root, layer=layer)
    if not s.train_missing:
        where = f"set ${s.releases_env} (the suite's root) or " if s.releases_env else ""
        raise ConfigError(
            f"no SAE for layer {layer}: {where}--config.sae.releases.{layer}=PATH, or --config.sae.train_missing=true "
            "to train one here"
        )
    return None


def load_release(release: str, d_model: int, layer: int) -> SAE:
    """The public SAE at `release` (sae.releases.<layer>), checked to read the model's residual width."""
    sae = load(release)
    if sae.d_in != d_model:
        raise ConfigError(
            f"sae.releases.{layer}={release}: the SAE reads d_in={sae.d_in}, the model's residual is "
            f"d_model={d_model} (wrong base model or hookpoint?)"
        )
    return sae
