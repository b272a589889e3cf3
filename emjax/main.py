"""emjax entry point.

    python -m emjax.main                                  # the embedded tiny default
    python -m emjax.main --config=gemma27b --config.model.checkpoint=/ckpt/gemma-2-27b
    python -m emjax.main --config=tiny --config.extract.layers=0,3 --stages=extract,summarize

`--config` is a name in configs/ or a path to a .py file with get_config();
`--config.a.b=value` overrides one field (typed; unknown keys are errors).
"""

from __future__ import annotations

import logging
import os
import sys

import jax
from absl import app, flags

from emjax import artifacts, distributed, pipeline
from emjax import config as config_lib
from emjax.data.chat import DataError
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


def parse_flags(argv: list[str]) -> list[str]:
    rest, overrides = split_overrides(argv)
    _overrides.extend(overrides)
    return FLAGS(rest)


def resolve_config(name: str, overrides: list[str], run_dir: str | None) -> config_lib.ExperimentConfig:
    cfg = config_lib.apply_overrides(config_lib.load_config(name), overrides)
    if run_dir:
        cfg.run_dir = run_dir
    return config_lib.resolve_checkpoint(cfg)


# Errors that mean "fix this input": printed as one line (--debug prints the traceback).
_USER_ERRORS = (config_lib.ConfigError, DataError, CheckpointError, SAELoadError, UnsafePickleError, OSError)


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
