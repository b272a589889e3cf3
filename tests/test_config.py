"""Config files, typed overrides and the command line."""

import json
import os
import subprocess
import sys

import pytest

from emjax import config as config_lib
from emjax.main import resolve_config, split_overrides


def test_overrides_are_parsed_to_the_field_type():
    cfg = config_lib.apply_overrides(
        config_lib.load_config("tiny"),
        [
            "model.dtype=bfloat16",
            "seed=7",
            "extract.layers=0,3",
            "tokenizer.train=false",
            "data.source=/x/y.jsonl",
            'mesh.rules={"mlp": ["fsdp"]}',
            "model.checkpoint=none",
        ],
    )
    assert cfg.model.dtype == "bfloat16"
    assert cfg.seed == 7
    assert cfg.extract.layers == (0, 3)
    assert cfg.tokenizer.train is False
    assert cfg.data.source == "/x/y.jsonl"
    assert cfg.mesh.rules == {"mlp": ["fsdp"]}
    assert cfg.model.checkpoint is None
    assert config_lib.apply_overrides(cfg, ["extract.layers=(5,)"]).extract.layers == (5,)


def test_overrides_do_not_touch_the_original():
    base = config_lib.load_config("tiny")
    config_lib.apply_overrides(base, ["extract.batch_size=3"])
    assert base.extract.batch_size == 16


@pytest.mark.parametrize(
    "override, message",
    [
        ("extract.layres=1", r"unknown config key 'extract.layres' \(did you mean 'extract.layers'\?\).*batch_size"),
        ("nonsense=1", "unknown config key 'nonsense'; valid keys at the top level: name, seed"),
        ("seed=abc", "seed: cannot parse 'abc' as int"),
        ("tokenizer.train=maybe", "expected true or false"),
        ("model.dtype=float33", "model.dtype: 'float33' is not one of float32, bfloat16, float16"),
        ("model=3", "'model' is a section"),
        ("seed.x=3", "'seed' is a value, not a section"),
        ("seed", "must look like key=value"),
    ],
)
def test_bad_overrides_fail_clearly(override, message):
    with pytest.raises(config_lib.ConfigError, match=message):
        config_lib.apply_overrides(config_lib.load_config("tiny"), [override])


def test_config_by_name_or_path(tmp_path):
    assert config_lib.load_config("gemma27b").model.checkpoint_env == "EMJAX_GEMMA2_27B"
    custom = tmp_path / "mine.py"
    custom.write_text(
        "from emjax.config import ExperimentConfig\n"
        "def get_config():\n    return ExperimentConfig(name='mine', seed=3)\n"
    )
    assert config_lib.load_config(str(custom)).seed == 3
    with pytest.raises(config_lib.ConfigError, match="config 'nope' not found.*available: .*tiny"):
        config_lib.load_config("nope")


def test_checkpoint_from_config_or_environment(monkeypatch, tmp_path):
    model = config_lib.load_config("gemma2_2b").model
    monkeypatch.delenv("EMJAX_GEMMA2_2B", raising=False)
    with pytest.raises(config_lib.ConfigError, match=r"\$EMJAX_GEMMA2_2B.*never downloads"):
        config_lib.checkpoint_path(model)
    monkeypatch.setenv("EMJAX_GEMMA2_2B", str(tmp_path))
    assert config_lib.checkpoint_path(model) == tmp_path
    model.checkpoint = "/explicit"
    assert str(config_lib.checkpoint_path(model)) == "/explicit"


def test_resolved_config_records_the_checkpoint_from_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("EMJAX_GEMMA2_9B", str(tmp_path))
    cfg = resolve_config("gemma2_9b", [], None)
    assert cfg.model.checkpoint == str(tmp_path)
    assert config_lib.resolve_checkpoint(config_lib.load_config("tiny")).model.checkpoint is None


def test_resolved_config_round_trips_through_json():
    cfg = resolve_config("tiny", ["extract.layers=0,2"], "/tmp/somewhere")
    data = json.loads(json.dumps(config_lib.to_dict(cfg)))
    assert config_lib.from_dict(config_lib.ExperimentConfig, data) == cfg
    assert cfg.resolved_run_dir().as_posix() == "/tmp/somewhere"


def test_command_line_overrides_split_from_absl_flags():
    rest, overrides = split_overrides(
        ["prog", "--config=tiny", "--config.seed=4", "--config.model.dtype", "float32", "--stages=build"]
    )
    assert rest == ["prog", "--config=tiny", "--stages=build"]
    assert overrides == ["seed=4", "model.dtype=float32"]


def test_unknown_key_on_the_command_line_exits_with_the_message(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "emjax.main", "--config=tiny", "--config.model.dtpye=float32", f"--run_dir={tmp_path}"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode != 0
    assert "unknown config key 'model.dtpye' (did you mean 'model.dtype'?)" in result.stderr
    assert not any(tmp_path.iterdir())


@pytest.mark.slow
def test_missing_checkpoint_on_the_command_line_names_the_variable(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "EMJAX_GEMMA2_2B"}
    result = subprocess.run(
        [sys.executable, "-m", "emjax.main", "--config=gemma2_2b", f"--run_dir={tmp_path}"],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
    )
    assert result.returncode != 0
    assert "set --config.model.checkpoint=/path/to/hf_checkpoint_dir or set $EMJAX_GEMMA2_2B" in result.stderr
