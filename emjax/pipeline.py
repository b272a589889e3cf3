"""Stages of an experiment and the runner that skips what is already done.

Each stage writes into `<run_dir>/<stage>.partial/` and is renamed to
`<run_dir>/<stage>/` with a manifest.json once complete. The manifest holds a
hash of the config sections the stage reads and of its inputs' manifests; a
rerun skips a stage whose manifest matches and redoes one whose inputs or
config changed. A killed stage leaves its .partial directory, and a stage that
works in shards (extract) resumes there, provided its hash is unchanged.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import shutil
import time
from collections.abc import Callable
from functools import cached_property
from pathlib import Path

from emjax import artifacts, distributed
from emjax import config as config_lib

_log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class Stage:
    name: str
    run: Callable[[Context, Path], dict]
    config_sections: tuple[str, ...]  # the parts of the config this stage reads: sections or dotted fields
    inputs: tuple[str, ...] = ()  # stages whose outputs it reads


class Context:
    """What stages share: the config, the run directory, the mesh and earlier stages' outputs."""

    def __init__(self, config: config_lib.ExperimentConfig):
        self.config = config
        self.run_dir = config.resolved_run_dir()

    @cached_property
    def mesh(self):
        m = self.config.mesh
        return distributed.make_mesh(m.data, m.fsdp, m.tensor, m.expert)

    @cached_property
    def rules(self):
        overrides = {k: tuple(v) for k, v in (self.config.mesh.rules or {}).items()}
        return distributed.DEFAULT_RULES | overrides

    def output(self, stage: str) -> Path:
        return self.run_dir / stage

    def manifest(self, stage: str) -> dict:
        return json.loads((self.output(stage) / "manifest.json").read_text())


def stage_key(ctx: Context, stage: Stage) -> str:
    cfg = config_lib.to_dict(ctx.config)
    parts = {"config": {s: _lookup(cfg, s) for s in stage.config_sections}}
    parts["inputs"] = {name: ctx.manifest(name)["key"] for name in stage.inputs}
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _lookup(tree: dict, dotted: str):
    for part in dotted.split("."):
        tree = tree[part]
    return tree


def run(config: config_lib.ExperimentConfig, stages: list[str] | None = None) -> Context:
    from emjax.stages import STAGES  # the stage implementations import the heavy modules

    config = config_lib.resolve_checkpoint(config)

    by_name = {s.name: s for s in STAGES}
    selected = list(stages or config.stages)
    unknown = [s for s in selected if s not in by_name]
    if unknown:
        raise config_lib.ConfigError(f"unknown stages {unknown}; stages are {', '.join(by_name)}")
    ctx = Context(config)
    for stage in (by_name[name] for name in by_name if name in selected):
        for needed in stage.inputs:
            if not (ctx.output(needed) / "manifest.json").is_file():
                raise RuntimeError(
                    f"stage {stage.name!r} needs the output of {needed!r}, which {ctx.output(needed)} does not "
                    f"hold yet: add {needed!r} to --stages"
                )
        key = stage_key(ctx, stage)
        final = ctx.output(stage.name)
        if (final / "manifest.json").is_file() and ctx.manifest(stage.name)["key"] == key:
            _log.info("stage %s: up to date (%s), skipped", stage.name, final)
            continue
        _run_stage(ctx, stage, key, final)
    return ctx


def _run_stage(ctx: Context, stage: Stage, key: str, final: Path) -> None:
    work = final.with_name(final.name + ".partial")
    main = distributed.is_main_process()
    if main:
        key_file = work / ".key"
        if work.exists() and (not key_file.is_file() or key_file.read_text() != key):
            shutil.rmtree(work)  # left by a run with another config: nothing in it can be reused
        work.mkdir(parents=True, exist_ok=True)
        key_file.write_text(key)
    distributed.sync_processes(f"{stage.name} set up")
    _log.info("stage %s: running into %s", stage.name, work)
    start = time.perf_counter()
    summary = stage.run(ctx, work)
    if main:
        manifest = {"stage": stage.name, "key": key, "seconds": round(time.perf_counter() - start, 2), **summary}
        artifacts.write_text(work / "manifest.json", json.dumps(manifest, indent=2, default=str) + "\n")
        (work / ".key").unlink()
        if final.exists():
            shutil.rmtree(final)
        os.replace(work, final)
    distributed.sync_processes(f"{stage.name} done")
    _log.info("stage %s: done in %.1fs", stage.name, time.perf_counter() - start)
