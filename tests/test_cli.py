"""The command lines: help that exits 0 and says what there is, one-line errors for misspelt flags and names."""

import os
import subprocess
import sys

import pytest

from emjax import report, serve, sweep
from emjax.stages import STAGES


def run_main(*args, timeout=120):
    return subprocess.run(
        [sys.executable, "-m", "emjax.main", *args], capture_output=True, text=True, timeout=timeout,
        env=os.environ | {"JAX_PLATFORMS": "cpu"},
    )  # fmt: skip


def test_main_help_lists_configs_stages_and_flags_and_exits_0():
    result = run_main("--help")
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "configs: " in out and all(name in out for name in ("tiny", "toy", "gemma27b"))
    for stage in STAGES:
        assert f"\n  {stage.name} " in out
    assert "--config: config name" in out and "--run_dir" in out and "--config.a.b=value" in out


def test_a_misspelt_flag_is_one_line_with_the_suggestion():
    result = run_main("--confg=toy")
    assert result.returncode != 0
    assert result.stderr.strip().splitlines() == [
        "error: unknown flag --confg (did you mean --config?); flags are --compilation_cache, --config, --debug, "
        "--run_dir, --stages and --config.KEY=VALUE"
    ]


def test_serve_with_an_unknown_config_is_one_line(capsys):
    with pytest.raises(SystemExit) as stop:
        serve.main(["--config=tinyy"])
    message = str(stop.value.code)
    assert message.startswith("error: config 'tinyy' not found") and "available: " in message and "tiny" in message
    assert "\n" not in message


def test_serve_help_gives_each_flag_its_meaning_and_default(capsys):
    with pytest.raises(SystemExit) as stop:
        serve.main(["--help"])
    assert stop.value.code == 0
    out = " ".join(capsys.readouterr().out.split())
    assert out.startswith("usage: python -m emjax.serve")
    for flag, says in [
        ("--model MODEL", "checkpoint directory"),
        ("--config CONFIG", "one of --model and --config is required"),
        ("--run_dir RUN_DIR", "(default: runs/<config name>)"),
        ("--adapter ADAPTER", "(default: none)"),
        ("--tokenizer TOKENIZER", "(default: the model's)"),
        ("--name NAME", "(default: the model's directory name)"),
        ("--prompt-format {chat,plain}", "(default: chat)"),
        ("--dtype {float32,bfloat16,float16}", "(default: float32 on CPU, bfloat16 on accelerators)"),
        ("--host HOST", "(default: 127.0.0.1, this machine only)"),
        ("--port PORT", "(default: 8000)"),
    ]:
        at = out.index(f"{flag} ", out.index("options:"))
        assert says in out[at : at + 200], flag


def test_report_help_names_the_module_to_run(capsys):
    with pytest.raises(SystemExit) as stop:
        report.main(["--help"])
    assert stop.value.code == 0
    assert capsys.readouterr().out.startswith("usage: python -m emjax.report ")


def test_sweep_help_names_the_module_to_run(capsys):
    with pytest.raises(SystemExit) as stop:
        sweep.main(["--help"])
    assert stop.value.code == 0
    assert capsys.readouterr().out.startswith("usage: python -m emjax.sweep ")


def test_the_readme_runs_every_command_in_the_virtual_environment():
    import re
    from pathlib import Path

    text = (Path(__file__).parents[1] / "README.md").read_text()
    bare = re.findall(r"(?<![\w/.])python -m (?!venv)\S+", text)  # `python -m venv .venv` creates it
    assert not bare, f"README commands without .venv/bin/: {bare}"
    assert "source .venv/bin/activate" in text
