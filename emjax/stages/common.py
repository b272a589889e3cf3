"""What several stages share: reading chat sources and finding the built checkpoint."""

from __future__ import annotations

from pathlib import Path

from emjax import config as config_lib
from emjax.data import chat, synthetic


def read_chats(source: str, limit: int | None, seed: int):
    """Conversations from the synthetic corpus (`limit` of them) or a chat dataset."""
    if source == "synthetic":
        return synthetic.synthetic_chats(limit, seed=seed)
    return chat.read_chats(source, limit=limit)


def source_path(source: str | None) -> dict[str, str]:
    """The external file behind a data source, for fingerprints (none for synthetic or hub ids)."""
    if not source or source == "synthetic" or source.startswith(("hf:", "synthetic:")):
        return {}
    return {"source": source}


def checkpoint_input(model) -> dict[str, Path]:
    """The checkpoint a config loads (none when it builds from model.arch)."""
    return {} if model.arch is not None else {"checkpoint": config_lib.checkpoint_path(model)}


def built_checkpoint(ctx) -> Path:
    return ctx.output("build") / ctx.manifest("build")["checkpoint"]
