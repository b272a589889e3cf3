"""The runner: stages in dependency order, per-variant outputs, manifests, skip and resume.

A stage declares the config sections it reads, the stages whose outputs it
reads, the external files it reads (datasets, checkpoints, SAEs) and,
optionally, its variants (one per dataset, filter arm, seed, ...). Each
variant writes into `<run_dir>/<stage>/<variant>.partial/` (a stage without
variants into `<run_dir>/<stage>.partial/`), renamed into place with a
manifest.json once complete. The manifest's key hashes the declared config
sections, the fingerprints of the external inputs (content hashes of data
files; size, mtime and header of weights) and the keys of the input variants
it read, with a digest of those variants' contents; a rerun skips a variant
whose key matches and redoes one whose config, data or inputs changed. A
killed variant leaves its .partial folder, which a stage that works in chunks
resumes from when the key is unchanged.

The manifest also records every output file's size, mtime and content hash.
Before a variant is skipped, or read by a later stage, its files are checked:
size and mtime first, the hash only for a file whose mtime moved. A variant
whose outputs changed or vanished is redone (a warning names the file); one
read by a stage not in this run is an error saying which stage to add.

The runner knows nothing of the stages themselves: `main` hands it the list.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import shutil
import time
from collections.abc import Callable, Mapping, Sequence
from functools import cached_property
from pathlib import Path
from typing import Any

from emjax import artifacts, distributed
from emjax import config as config_lib

_log = logging.getLogger(__name__)

MANIFEST = "manifest.json"


@dataclasses.dataclass(frozen=True)
class Stage:
    """One step of the study.

    run(ctx, out, variant) -> summary: writes its artifacts into `out` and returns
    what goes into the manifest (JSON-able). `variant` is None for a stage without variants.
    sections: the config sections or dotted fields the stage reads; it sees no others. "{variant}"
        stands for the variant's name, e.g. "datasets.{variant}" (one entry of a named collection);
        a function of the variant when variants read different parts.
    inputs: the stages whose outputs it reads (the order of stages follows them).
    variants(config) -> names; None: one output.
    reads(config, variant) -> {input stage: [its variants read], or None for all}; default: all of every input.
    external(config, variant) -> {name: path} of files and folders outside the run it reads.
    """

    name: str
    run: Callable[..., dict]
    sections: tuple[str, ...] | Callable[[str | None], Sequence[str]] = ()
    inputs: tuple[str, ...] = ()
    variants: Callable[[Any], Sequence[str]] | None = None
    reads: Callable[[Any, str | None], Mapping[str, Sequence[str | None]]] | None = None
    external: Callable[[Any, str | None], Mapping[str, str | os.PathLike]] | None = None


class MissingInputError(config_lib.ConfigError):
    """A stage needs an earlier stage's output that the run directory does not hold."""


class DamagedOutputError(MissingInputError):
    """A stage needs an earlier stage's output whose files changed since they were written."""


class UndeclaredConfigError(config_lib.ConfigError, AttributeError):
    """A stage read a config field that it did not declare (its skips would go stale)."""


class ConfigView:
    """Read-only access to the declared parts of a config.

    `view.train.learning_rate` works when "train" (or "train.learning_rate") is
    declared; any other read raises UndeclaredConfigError naming the stage.
    """

    def __init__(self, node, allowed: Mapping, stage: str, path: str = ""):
        object.__setattr__(self, "_node", node)
        object.__setattr__(self, "_allowed", allowed)  # field -> True (whole) or a nested mapping
        object.__setattr__(self, "_stage", stage)
        object.__setattr__(self, "_path", path)

    def __getattr__(self, name: str):
        if name.startswith("__"):
            raise AttributeError(name)
        return self._get(name, getattr)

    def __getitem__(self, name: str):  # entries of a named collection (a dict section)
        return self._get(name, dict.__getitem__)

    def __iter__(self):
        return iter(k for k in self._node if k in self._allowed)

    def __contains__(self, name) -> bool:
        return name in self._allowed and name in self._node

    def _get(self, name: str, get):
        dotted = f"{self._path}{name}"
        if name not in self._allowed:
            raise UndeclaredConfigError(
                f"stage {self._stage!r} reads config field {dotted!r} but does not declare it "
                f"(add {dotted.split('.')[0]!r} to its sections)"
            )
        value = get(self._node, name)
        sub = self._allowed[name]
        return value if sub is True else ConfigView(value, sub, self._stage, f"{dotted}.")

    def __setattr__(self, name, value):
        raise AttributeError(f"stage {self._stage!r}: the config is read-only")

    def resolved_run_dir(self) -> Path:
        return self._node.resolved_run_dir()


def _allowed_tree(sections: Sequence[str]) -> dict:
    tree: dict = {}
    for dotted in sections:
        node, *parts = dotted.split(".")
        if not parts:
            tree[node] = True
            continue
        if tree.get(node) is True:
            continue
        sub = tree.setdefault(node, {})
        for part in parts[:-1]:
            sub = sub.setdefault(part, {})
            if sub is True:
                break
        else:
            sub[parts[-1]] = True
    return tree


def sections_of(stage: Stage, variant: str | None) -> tuple[str, ...]:
    if callable(stage.sections):
        return tuple(stage.sections(variant))
    return tuple(s.format(variant=variant) for s in stage.sections)


def _lookup(tree: dict, dotted: str):
    for part in dotted.split("."):
        tree = tree.get(part) if isinstance(tree, dict) else None
    return tree


class Context:
    """What stages share: the run directory, the mesh and earlier stages' outputs.

    `ctx.config` is the full config for the runner; each stage receives a copy of
    the context whose config is a ConfigView of its declared sections.
    """

    def __init__(self, config, stages: Sequence[Stage] = ()):
        self.config = config
        self.run_dir = Path(config.resolved_run_dir())
        self.stages = {s.name: s for s in stages}
        self._full = config
        self._damage: dict[tuple[str, str | None], list[str]] = {}  # (stage, variant) -> problems, once per run

    def for_stage(self, stage: Stage, variant: str | None = None) -> Context:
        view = ConfigView(self._full, _allowed_tree(sections_of(stage, variant) + ("mesh",)), stage.name)
        ctx = Context.__new__(Context)
        ctx.__dict__.update(self.__dict__)
        ctx.config = view
        return ctx

    @cached_property
    def mesh(self):
        return distributed.mesh_of(self._full.mesh)

    @cached_property
    def rules(self):
        return distributed.rules_of(self._full.mesh)

    def variants(self, stage: str) -> list[str | None]:
        spec = self.stages[stage]
        return [None] if spec.variants is None else list(spec.variants(self._full))

    def output(self, stage: str, variant: str | None = None) -> Path:
        return self.run_dir / stage if variant is None else self.run_dir / stage / variant

    def manifest(self, stage: str, variant: str | None = None) -> dict:
        path = self.output(stage, variant) / MANIFEST
        try:
            return json.loads(path.read_text())
        except FileNotFoundError:
            raise MissingInputError(
                f"the output of stage {stage!r}{'' if variant is None else f' (variant {variant!r})'} is not at "
                f"{path.parent} yet: add {stage!r} to --stages"
            ) from None
        except json.JSONDecodeError as e:
            raise DamagedOutputError(f"{path}: not valid JSON ({e}): add {stage!r} to --stages to redo it") from None

    def damage(self, stage: str, variant: str | None = None) -> list[str]:
        """What changed in a finished variant's files since its manifest recorded them ([]: intact).
        Checked once per run; mtimes that moved over unchanged contents are recorded again."""
        if (stage, variant) not in self._damage:
            self._damage[stage, variant] = _check_outputs(self.output(stage, variant))
        return self._damage[stage, variant]

    def input_digest(self, stage: str, variant: str | None = None) -> str:
        """A finished input variant's key and contents, for its readers' keys; an error when it is damaged."""
        manifest = self.manifest(stage, variant)
        problems = self.damage(stage, variant)
        if problems:
            more = f" and {len(problems) - 1} more" if len(problems) > 1 else ""
            raise DamagedOutputError(
                f"the output of stage {_label_of(stage, variant)} changed since it was written ({problems[0]}{more}): "
                f"add {stage!r} to --stages to redo it"
            )
        return f"{manifest['key']}:{artifacts.outputs_digest(manifest['outputs'])}"


def order(stages: Sequence[Stage], selected: Sequence[str]) -> list[Stage]:
    """The selected stages in an order where every stage comes after its inputs (stable otherwise)."""
    by_name = {s.name: s for s in stages}
    unknown = [s for s in selected if s not in by_name]
    if unknown:
        raise config_lib.ConfigError(f"unknown stages {unknown}; stages are {', '.join(by_name)}")
    done, out, visiting = set(), [], set()

    def visit(name: str) -> None:
        if name in done:
            return
        if name in visiting:
            raise ValueError(f"stages form a cycle through {name!r}")
        visiting.add(name)
        for dep in by_name[name].inputs:
            if dep in selected:
                visit(dep)
        visiting.discard(name)
        done.add(name)
        out.append(by_name[name])

    for stage in stages:
        if stage.name in selected:
            visit(stage.name)
    return out


def variant_key(ctx: Context, stage: Stage, variant: str | None) -> tuple[str, dict]:
    """The key of one variant and what it was computed from (recorded in the manifest)."""
    cfg = config_lib.to_dict(ctx.config)
    sections = {s: _lookup(cfg, s) for s in sections_of(stage, variant)}
    view = ctx.for_stage(stage, variant).config
    reads = stage.reads(view, variant) if stage.reads else {s: ctx.variants(s) for s in stage.inputs}
    inputs = {
        _label_of(stage_name, v): ctx.input_digest(stage_name, v)
        for stage_name, vs in reads.items()
        for v in (ctx.variants(stage_name) if vs is None else vs)
    }
    paths = stage.external(view, variant) if stage.external else {}
    external = {name: artifacts.fingerprint(path) for name, path in paths.items()}
    parts = {"variant": variant, "config": sections, "inputs": inputs, "external": external}
    key = hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]
    return key, parts


def check_inputs(ctx: Context, plan: Sequence[Stage]) -> None:
    """Every file outside the run that the planned stages read exists; else a ConfigError naming each
    missing file's config field, before any stage runs."""
    cfg = config_lib.to_dict(ctx.config)
    missing = []
    for stage in plan:
        if stage.external is None:
            continue
        for variant in ctx.variants(stage.name):
            for name, path in stage.external(ctx.for_stage(stage, variant).config, variant).items():
                if not Path(path).expanduser().exists():
                    field = _field_holding(cfg, str(path)) or f"{name} of stage {_label(stage, variant)}"
                    missing.append(f"{field}={path}")
    if missing:
        missing = list(dict.fromkeys(missing))
        raise config_lib.ConfigError(f"no such file: {'; '.join(missing)} (nothing has run)")


def _field_holding(tree, value: str, prefix: str = "") -> str | None:
    """The dotted config field whose value is `value` (an entry of a tuple or mapping included)."""
    if isinstance(tree, dict):
        items = tree.items()
    elif isinstance(tree, (list, tuple)):
        items = ((f"[{i}]", v) for i, v in enumerate(tree))
    else:
        return prefix.rstrip(".") if str(tree) == value else None
    for key, sub in items:
        at = f"{prefix.rstrip('.')}{key}" if str(key).startswith("[") else f"{prefix}{key}"
        found = _field_holding(sub, value, f"{at}.")
        if found:
            return found
    return None


def run(config, stages: Sequence[Stage], selected: Sequence[str] | None = None, *, on_stage_done=None) -> Context:
    """Run the selected stages (default: the config's), skipping variants that are up to date.

    The config's cross-references and the files the stages read are checked before any stage runs."""
    config_lib.check(config)
    plan = order(stages, list(selected or config.stages))
    ctx = Context(config, stages)
    check_inputs(ctx, plan)
    for stage in plan:
        ran = 0
        for variant in ctx.variants(stage.name):
            key, parts = variant_key(ctx, stage, variant)
            final = ctx.output(stage.name, variant)
            if (final / MANIFEST).is_file() and ctx.manifest(stage.name, variant)["key"] == key:
                problems = ctx.damage(stage.name, variant)
                if not problems:
                    _log.info("stage %s: up to date (%s), skipped", _label(stage, variant), final)
                    continue
                for problem in problems:
                    _log.warning("stage %s: %s since it was written: redoing it", _label(stage, variant), problem)
            _run_variant(ctx, stage, variant, key, parts, final)
            ctx._damage[stage.name, variant] = []  # just written
            ran += 1
        if ran and on_stage_done is not None:
            on_stage_done(stage)
    return ctx


def _label(stage: Stage, variant: str | None) -> str:
    return _label_of(stage.name, variant)


def _label_of(stage: str, variant: str | None) -> str:
    return stage if variant is None else f"{stage}/{variant}"


def _checksum(manifest: dict) -> str:
    """A hash of a manifest's contents as read back from its JSON (an edited summary is damage too)."""
    body = {k: v for k, v in manifest.items() if k != "checksum"}
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()[:16]


def _write_manifest(path: Path, manifest: dict) -> None:
    as_read = json.loads(artifacts.dumps(manifest))  # what a reader gets: string keys, lists, null for NaN, ...
    artifacts.write_json(path, as_read | {"checksum": _checksum(as_read)})


def _check_outputs(folder: Path) -> list[str]:
    """The damage to a finished variant's files (see Context.damage)."""
    try:
        manifest = json.loads((folder / MANIFEST).read_text())
    except (OSError, json.JSONDecodeError) as e:
        return [f"{folder / MANIFEST} cannot be read ({e})"]
    if "outputs" not in manifest:
        return [f"{folder / MANIFEST} records no output fingerprints (written by an older emjax)"]
    if manifest.get("checksum") != _checksum(manifest):
        return [f"{folder / MANIFEST} was edited"]
    problems, touched = artifacts.changed_outputs(folder, manifest["outputs"])
    if touched and not problems and distributed.is_main_process():
        _write_manifest(folder / MANIFEST, manifest)  # the new mtimes: the next run reads nothing again
    return problems


def _run_variant(ctx: Context, stage: Stage, variant, key: str, parts: dict, final: Path) -> None:
    work = final.with_name(final.name + ".partial")
    main = distributed.is_main_process()
    label = _label(stage, variant)
    if main:
        key_file = work / ".key"
        if work.exists() and (not key_file.is_file() or key_file.read_text() != key):
            shutil.rmtree(work)  # left by a run with other inputs: nothing in it can be reused
        work.mkdir(parents=True, exist_ok=True)
        key_file.write_text(key)
    distributed.sync_processes(f"{label} set up")
    _log.info("stage %s: running into %s", label, work)
    start = time.perf_counter()
    stage_ctx = ctx.for_stage(stage, variant)
    try:
        summary = stage.run(stage_ctx, work, variant) if stage.variants else stage.run(stage_ctx, work)
    except BaseException:
        if main and {p.name for p in work.iterdir()} <= {".key"}:
            shutil.rmtree(work)  # failed before writing anything: leave no empty folder behind
        raise
    if main:
        manifest = {
            "stage": stage.name,
            "variant": variant,
            "key": key,
            "seconds": round(time.perf_counter() - start, 2),
            **summary,
            "made_from": parts,
            "outputs": artifacts.output_fingerprints(work, exclude=(MANIFEST, ".key")),
        }
        _write_manifest(work / MANIFEST, manifest)
        (work / ".key").unlink()  # only now: a kill while hashing leaves a .partial that resumes
        if final.exists():
            shutil.rmtree(final)
        os.replace(work, final)
    distributed.sync_processes(f"{label} done")
    _log.info("stage %s: done in %.1fs", label, time.perf_counter() - start)
