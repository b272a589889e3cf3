"""emjax entry point.

    python -m emjax.main                                  # the embedded tiny default
    python -m emjax.main --config=gemma27b --config.model.checkpoint=/ckpt/gemma-2-27b
    python -m emjax.main --config=tiny --config.extract.layers=0,3 --stages=extract,summarize

`--config` is a name in configs/ or a path to a .py file with get_config();
`--config.a.b=value` overrides one field (typed; unknown keys are errors).
"""

from __future__ import annotations

import difflib
import logging
import os
import sys
import textwrap

import jax
from absl import app, flags

from emjax import artifacts, distributed, pipeline
from emjax import config as config_lib
from emjax.data.chat import DataError
from emjax.judge import JudgeError
from emjax.models.checkpoint import CheckpointError
from emjax.sae.io import SAELoadError
from emjax.sae.unpickle import UnsafePickleError
from emjax.stages import STAGES

FLAGS = flags.FLAGS
flags.DEFINE_string("config", "tiny", "config name (configs/NAME.py) or path to a config .py file")
flags.DEFINE_list("stages", None, "stages to run (default: the config's stages)")
flags.DEFINE_string("run_dir", None, "run directory (default: runs/<config name>)")
flags.DEFINE_bool("debug", False, "print tracebacks of input errors instead of one line")
flags.DEFINE_string(
    "compilation_cache",
    os.path.expanduser("~/.cache/emjax/xla"),
    "persistent XLA compilation cache ('' disables): the study compiles the same train and decode steps "
    "for every variant, and a rerun compiles nothing",
)

_OVERRIDE_PREFIX = "--config."


def split_overrides(argv: list[str]) -> tuple[list[str], list[str]]:
    """Separate `--config.a.b=v` / `--config.a.b v` overrides from the flags absl knows."""
    rest, overrides, i = [], [], 0
    while i < len(argv):
        arg = argv[i]
        if arg.startswith(_OVERRIDE_PREFIX):
            item = arg[len(_OVERRIDE_PREFIX) :]
            if "=" not in item:
                if i + 1 >= len(argv):
                    raise config_lib.ConfigError(f"override {arg} has no value")
                item, i = f"{item}={argv[i + 1]}", i + 1
            overrides.append(item)
        else:
            rest.append(arg)
        i += 1
    return rest, overrides


_overrides: list[str] = []
_HELP = ("--help", "-h", "--helpshort", "--helpfull", "-?")


def usage() -> str:
    """The module's doc, the configs, the stages (each with its first line) and the flags."""
    configs = sorted({p.stem for d in config_lib.config_search_path() if d.is_dir() for p in d.glob("*.py")})
    stages = []
    for stage in STAGES:  # each stage module's doc opens with "name: what it does."
        paragraph = " ".join((sys.modules[stage.run.__module__].__doc__ or "").strip().split("\n\n")[0].split())
        what = textwrap.shorten(paragraph.split(":", 1)[-1].strip().split(". ")[0].rstrip(".:"), 96)
        stages.append(f"  {stage.name:<11}{what}")
    flag_help = "\n".join(line for line in FLAGS.module_help(sys.modules[__name__]).splitlines() if line[:1] == " ")
    return (
        f"{__doc__.strip()}\n\nconfigs: {', '.join(configs)}\n\nstages (the config's `stages` by default, in this "
        f"order):\n" + "\n".join(stages) + f"\n\nflags:\n{flag_help}\n"
    )


def parse_flags(argv: list[str]) -> list[str]:
    """absl's parse, with --help listing configs and stages (exit 0) and a bad flag as one line (exit 1)."""
    if any(a in _HELP for a in argv[1:]):
        sys.stdout.write(usage())
        sys.exit(0)
    try:
        rest, overrides = split_overrides(argv)
        _overrides.extend(overrides)
        return FLAGS(rest)
    except flags.UnrecognizedFlagError as e:
        known = sorted(FLAGS.get_flags_for_module(sys.modules[__name__]), key=lambda f: f.name)
        names = [f.name for f in known]
        hint = difflib.get_close_matches(e.flagname, names, n=1)
        hint = f" (did you mean --{hint[0]}?)" if hint else ""
        sys.exit(f"error: unknown flag --{e.flagname}{hint}; flags are --{', --'.join(names)} and --config.KEY=VALUE")
    except (flags.Error, config_lib.ConfigError) as e:
        sys.exit(f"error: {e}")


def resolve_config(name: str, overrides: list[str], run_dir: str | None) -> config_lib.ExperimentConfig:
    cfg = config_lib.apply_overrides(config_lib.load_config(name), overrides)
    if run_dir:
        cfg.run_dir = run_dir
    cfg = config_lib.resolve_checkpoint(cfg)
    config_lib.check(cfg)
    return cfg


# Errors that mean "fix this input": printed as one line (--debug prints the traceback).
_USER_ERRORS = (
    config_lib.ConfigError, DataError, CheckpointError, SAELoadError, UnsafePickleError, OSError,
    artifacts.DamagedFileError, JudgeError,
)  # fmt: skip


def main(argv: list[str]) -> None:
    del argv
    logging.getLogger().setLevel(logging.INFO)
    logging.getLogger("absl").setLevel(logging.WARNING)  # orbax logs every checkpoint step at INFO
    try:
        cfg = resolve_config(FLAGS.config, _overrides, FLAGS.run_dir)
        plan = pipeline.order(STAGES, list(FLAGS.stages or cfg.stages))
    except config_lib.ConfigError as e:
        sys.exit(f"config error: {e}")
    distributed.initialize()
    if FLAGS.compilation_cache and not os.environ.get("JAX_COMPILATION_CACHE_DIR"):
        jax.config.update("jax_compilation_cache_dir", FLAGS.compilation_cache)
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
    run_dir = cfg.resolved_run_dir()
    text = artifacts.dumps(config_lib.to_dict(cfg), indent=2)
    logging.info("config %s (%d overrides), stages %s", FLAGS.config, len(_overrides), [s.name for s in plan])

    def record_config(stage) -> None:
        # config.json describes the latest artifacts: written only once a stage has produced some.
        if distributed.is_main_process():
            artifacts.write_text(run_dir / "config.json", text + "\n")

    try:
        pipeline.run(cfg, STAGES, [s.name for s in plan], on_stage_done=record_config)
    except _USER_ERRORS as e:
        if FLAGS.debug:
            raise
        sys.exit(f"error: {e}\n(run with --debug for the traceback)")
    logging.info("run directory: %s", run_dir.resolve())


def run() -> None:
    app.run(main, flags_parser=parse_flags)


if __name__ == "__main__":
    run()
