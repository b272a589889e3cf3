"""Reading architecture numbers from a Hugging Face config.json.

Architecture numbers always come from the checkpoint's own config, never from
a table keyed on the model name. Missing fields are errors that name the field.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from emjax.models.checkpoint import CheckpointError

_MISSING = object()


def field(hf: Mapping[str, Any], key: str, default: Any = _MISSING, *, source: str = "config.json") -> Any:
    value = hf.get(key, default)
    if value is _MISSING:
        raise CheckpointError(f"{source}: required field {key!r} is missing")
    return value


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
