"""benchmarks/gpu.sh's driver (benchmarks/gpu_rows.py): its limits, presets and plumbing, without a GPU.

The rows themselves need a GPU; here fake rows (small Python commands) go through the same
process handling: results kept from a process killed at its limit, a skipped peer, the JSON file.
"""

import ast
import json
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"
sys.path.insert(0, str(BENCHMARKS))
import gpu_rows  # noqa: E402


def presets_of(script: Path) -> set[str]:
    """The keys of the PRESETS dict literal of a benchmark script, read without importing it."""
    for node in ast.parse(script.read_text()).body:
        if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == "PRESETS" for t in node.targets):
            return {key.value for key in node.value.keys}
    raise AssertionError(f"{script} has no PRESETS")


def test_the_limits_fit_eight_minutes():
    assert gpu_rows.check_budget() <= 8 * 60
    too_long = gpu_rows.Row("extra", "emjax", 481, (), ())
    with pytest.raises(SystemExit, match="over the 480 s budget"):
        gpu_rows.check_budget((*gpu_rows.ROWS, too_long))


@pytest.mark.parametrize("row", gpu_rows.ROWS, ids=lambda row: f"{row.name} [{row.side}]")
def test_every_row_names_an_existing_preset_in_both_modes(row):
    for args in (row.args, row.tiny_args):
        if row.side == "suite":
            assert (BENCHMARKS.parent / args[-1 if "-k" not in args else args.index("-k") - 1]).is_file()
            continue
        if args[:2] == ("-m", "emjax.dry_run"):  # a config, not a preset
            (name,) = [a.split("=", 1)[1] for a in args if a.startswith("--config=")]
            assert (BENCHMARKS.parent / "configs" / f"{name}.py").is_file()
            continue
        script = BENCHMARKS.parent / args[0]
        (preset,) = [a.split("=", 1)[1] for a in args if a.startswith("--preset=")]
        assert preset in presets_of(script), (script.name, preset)


def test_the_gpu_rows_are_the_issue_sizes():
    forward, train, generate = (presets_of(BENCHMARKS / f"{name}.py") for name in ("forward", "train", "generate"))
    assert {"gemma2-2b"} <= forward & train & generate
    text = (BENCHMARKS / "similarity.py").read_text()
    assert '"gpu": dict(shapes=[(16384, 131072, 2304)], k=32, dtype="bfloat16"' in text


def bench_line(**fields):
    return f"print('BENCH ' + {json.dumps(json.dumps(fields))}, flush=True)"


def test_rows_run_under_their_limits_into_one_json(tmp_path, monkeypatch):
    rows = (
        gpu_rows.Row("fast", "emjax", 30, ("-c", bench_line(run="emjax full forward", seconds=2.0)), ()),
        gpu_rows.Row("fast", "peer", 30, ("-c", bench_line(run="transformers full forward (sdpa)", seconds=5.0)), ()),
        gpu_rows.Row(
            "slow", "emjax", 3,
            ("-c", bench_line(run="emjax compile", seconds=1.0) + "; import time; time.sleep(60)"), (),
        ),
        gpu_rows.Row("absent", "peer", 30, ("-c", bench_line(skipped="torch not installed")), ()),
        gpu_rows.Row("broken", "emjax", 30, ("-c", "raise SystemExit(3)"), ()),
    )
    monkeypatch.setenv("OUT", str(tmp_path))
    monkeypatch.setenv("PYTHON", sys.executable)
    monkeypatch.delenv("EMJAX_GPU_SH_TINY", raising=False)
    monkeypatch.setattr(gpu_rows, "FORWARD", "fast")
    assert gpu_rows.main(rows) == 0
    report = json.loads((tmp_path / "gpu_results.json").read_text())
    status = {(r["name"], r["side"]): r for r in report["rows"]}
    assert status["fast", "emjax"]["status"] == "ok"
    slow = status["slow", "emjax"]
    assert slow["status"] == "timeout" and slow["wall_s"] < 30
    assert slow["results"] == [{"run": "emjax compile", "seconds": 1.0}]  # measured before the kill: kept
    assert status["absent", "peer"]["status"] == "skipped"
    assert status["broken", "emjax"]["status"] == "failed" and status["broken", "emjax"]["returncode"] == 3
    forward = next(t for t in report["targets"] if t["target"].startswith("forward"))
    assert forward["value"] == 2.5 and forward["met"] is True
    assert all(t["value"] is None for t in report["targets"] if not t["target"].startswith("forward"))
    assert "versions" in report["device"] and (tmp_path / "gpu_log.txt").is_file()
