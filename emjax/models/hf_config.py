"""Reading architecture numbers from a Hugging Face config.json.

Architecture numbers always come from the checkpoint's own config, never from
a table keyed on the model name. Missing fields are errors that name the field.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

from emjax.models.checkpoint import CheckpointError

_MISSING = object()
SLIDING, FULL = "sliding_attention", "full_attention"  # config.json's layer_types


def field(hf: Mapping[str, Any], key: str, default: Any = _MISSING, *, source: str = "config.json") -> Any:
    value = hf.get(key, default)
    if value is _MISSING:
        raise CheckpointError(f"{source}: required field {key!r} is missing")
    return value


@dataclasses.dataclass(frozen=True)
class DecoderShape:
    """The sizes every decoder family's config starts with (config.json's names: see decoder_hf)."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int


def decoder_fields(cls, hf: Mapping[str, Any], source: str = "config.json", *, derive_heads: bool = True) -> dict:
    """What every decoder family reads alike from config.json, as keyword arguments of its config class
    `cls` (a DecoderShape): the sizes, the head counts, rms_norm_eps and tie_word_embeddings (absent: cls's
    defaults).

    With derive_heads, a missing num_key_value_heads is one per query head and a missing head_dim is
    hidden_size // num_attention_heads; without (gpt-oss, whose head_dim is not that), both are required.
    """

    def get(key, *default):
        return field(hf, key, *default, source=source)

    hidden, heads = int(get("hidden_size")), int(get("num_attention_heads"))
    if derive_heads:
        if hidden % heads and not hf.get("head_dim"):
            raise ValueError(f"{source}: hidden_size {hidden} is not a multiple of num_attention_heads {heads}")
        head_dim, kv_heads = int(hf.get("head_dim") or hidden // heads), int(get("num_key_value_heads", heads))
    else:
        head_dim, kv_heads = int(get("head_dim")), int(get("num_key_value_heads"))
    if heads % kv_heads:
        raise ValueError(f"{source}: num_attention_heads {heads} is not a multiple of num_key_value_heads {kv_heads}")
    defaults = {f.name: f.default for f in dataclasses.fields(cls)}
    return dict(
        vocab_size=int(get("vocab_size")),
        hidden_size=hidden,
        intermediate_size=int(get("intermediate_size")),
        num_layers=int(get("num_hidden_layers")),
        num_heads=heads,
        num_kv_heads=kv_heads,
        head_dim=head_dim,
        rms_norm_eps=float(get("rms_norm_eps", defaults["rms_norm_eps"])),
        tie_word_embeddings=bool(hf.get("tie_word_embeddings", defaults["tie_word_embeddings"])),
    )


def decoder_hf(cfg: DecoderShape, architecture: str, model_type: str) -> dict[str, Any]:
    """The config.json fields alike in every family (what decoder_fields reads): the class, the model type, the
    sizes, rms_norm_eps and tie_word_embeddings."""
    return {
        "architectures": [architecture],
        "model_type": model_type,
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.hidden_size,
        "intermediate_size": cfg.intermediate_size,
        "num_hidden_layers": cfg.num_layers,
        "num_attention_heads": cfg.num_heads,
        "num_key_value_heads": cfg.num_kv_heads,
        "head_dim": cfg.head_dim,
        "rms_norm_eps": cfg.rms_norm_eps,
        "tie_word_embeddings": cfg.tie_word_embeddings,
    }


def sliding_fields(hf: Mapping[str, Any], num_layers: int, source: str = "config.json") -> dict:
    """sliding_window and layer_types of a family that alternates sliding-window and full attention, as keyword
    arguments of its config class; layer_types absent (older config.json files) alternate from a sliding
    layer 0, as transformers does."""
    types = tuple(hf.get("layer_types") or [SLIDING if i % 2 == 0 else FULL for i in range(num_layers)])
    if len(types) != num_layers or set(types) - {SLIDING, FULL}:
        raise ValueError(f"{source}: layer_types {types} do not describe {num_layers} layers of {SLIDING!r}/{FULL!r}")
    return dict(sliding_window=int(field(hf, "sliding_window", source=source)), layer_types=types)


def sliding_hf(cfg) -> dict[str, Any]:
    """The config.json fields sliding_fields reads."""
    return {"sliding_window": cfg.sliding_window, "layer_types": list(cfg.layer_types)}


def rope_theta(hf: Mapping[str, Any], default: float = 10000.0) -> float:
    """rope_theta from the raw layout or transformers-5 `rope_parameters`."""
    params = hf.get("rope_parameters") or {}
    if "rope_theta" in params:
        return float(params["rope_theta"])
    return float(hf.get("rope_theta", default))


def rope_scaling(hf: Mapping[str, Any]) -> dict[str, Any] | None:
    """The RoPE scaling block (`rope_scaling`, or `rope_parameters` in transformers 5), None when plain RoPE."""
    block = hf.get("rope_scaling") or hf.get("rope_parameters") or None
    if not block:
        return None
    kind = block.get("rope_type", block.get("type", "default"))
    return None if kind == "default" else dict(block, rope_type=kind)


def to_dict(config: Any) -> dict[str, Any]:
    """A plain dict from a transformers PretrainedConfig or a mapping."""
    if hasattr(config, "to_dict"):
        return config.to_dict()
    return dict(config)
