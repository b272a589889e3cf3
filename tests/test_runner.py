"""The pipeline runner with small stages of its own: config views, variants, order, fingerprints."""

import json
import os
import subprocess
import sys

import pytest

from emjax import config as config_lib
from emjax import pipeline
from emjax.pipeline import Stage


def make_config(tmp_path, **datasets):
    cfg = config_lib.ExperimentConfig(name="runner", run_dir=str(tmp_path / "run"))
    cfg.datasets = {name: config_lib.DatasetConfig(source=str(src)) for name, src in datasets.items()}
    return cfg


def study_stages(calls: list):
    """read: one variant per dataset (copies the file); count: all variants' sizes; seed: reads `seed`."""

    def read(ctx, out, variant):
        calls.append(f"read/{variant}")
        text = open(ctx.config.datasets[variant].source).read()
        (out / "copy.txt").write_text(text)
        return {"chars": len(text)}

    def count(ctx, out):
        calls.append("count")
        return {"total": sum(ctx.manifest("read", v)["chars"] for v in ctx.variants("read"))}

    return [
        Stage("count", count, inputs=("read",)),  # listed first: the order must come from the inputs
        Stage(
            "read",
            read,
            sections=("datasets.{variant}",),
            variants=lambda cfg: sorted(cfg.datasets),
            external=lambda cfg, variant: {"data": cfg.datasets[variant].source},
        ),  # fmt: skip
    ]


def test_stages_run_after_their_inputs_and_per_variant(tmp_path):
    (tmp_path / "a.txt").write_text("aaa")
    (tmp_path / "b.txt").write_text("bb")
    calls = []
    cfg = make_config(tmp_path, a=tmp_path / "a.txt", b=tmp_path / "b.txt")
    pipeline.run(cfg, study_stages(calls), ["count", "read"])
    assert calls == ["read/a", "read/b", "count"]
    run = tmp_path / "run"
    assert json.loads((run / "read" / "a" / "manifest.json").read_text())["chars"] == 3
    assert json.loads((run / "count" / "manifest.json").read_text())["total"] == 5
    manifest = json.loads((run / "read" / "b" / "manifest.json").read_text())
    assert manifest["made_from"]["config"]["datasets.b"]["source"] == str(tmp_path / "b.txt")


def test_a_rerun_redoes_only_what_changed(tmp_path):
    (tmp_path / "a.txt").write_text("aaa")
    (tmp_path / "b.txt").write_text("bb")
    cfg = make_config(tmp_path, a=tmp_path / "a.txt", b=tmp_path / "b.txt")
    pipeline.run(cfg, study_stages([]), ["read", "count"])
    calls = []
    pipeline.run(cfg, study_stages(calls), ["read", "count"])
    assert calls == []
    # Same path, new contents: the variant that reads it and what depends on it run again.
    (tmp_path / "b.txt").write_text("bbbb")
    pipeline.run(cfg, study_stages(calls), ["read", "count"])
    assert calls == ["read/b", "count"]
    # A new dataset adds one variant.
    calls.clear()
    (tmp_path / "c.txt").write_text("c")
    cfg.datasets["c"] = config_lib.DatasetConfig(source=str(tmp_path / "c.txt"))
    pipeline.run(cfg, study_stages(calls), ["read", "count"])
    assert calls == ["read/c", "count"]
    assert json.loads((tmp_path / "run" / "count" / "manifest.json").read_text())["total"] == 8


def test_a_stage_reading_an_undeclared_field_fails(tmp_path):
    def sneaky(ctx, out):
        return {"seed": ctx.config.seed}

    with pytest.raises(pipeline.UndeclaredConfigError, match="stage 'sneaky' reads config field 'seed'"):
        pipeline.run(make_config(tmp_path), [Stage("sneaky", sneaky, sections=("datasets",))], ["sneaky"])

    def nested(ctx, out):
        return {"dtype": ctx.config.model.dtype, "arch": ctx.config.model.arch}

    with pytest.raises(pipeline.UndeclaredConfigError, match="'model.arch'"):
        pipeline.run(make_config(tmp_path), [Stage("nested", nested, sections=("model.dtype",))], ["nested"])


def test_a_killed_variant_is_redone_and_its_partial_output_not_trusted(tmp_path):
    (tmp_path / "a.txt").write_text("aaa")
    cfg = make_config(tmp_path, a=tmp_path / "a.txt")
    partial = tmp_path / "run" / "read" / "a.partial"
    partial.mkdir(parents=True)
    (partial / "copy.txt").write_text("half")  # no .key: left by a run with other inputs
    pipeline.run(cfg, study_stages([]), ["read"])
    assert (tmp_path / "run" / "read" / "a" / "copy.txt").read_text() == "aaa"
    assert not partial.exists()


def test_unknown_stage_names_are_listed(tmp_path):
    with pytest.raises(config_lib.ConfigError, match=r"unknown stages \['nope'\]; stages are count, read"):
        pipeline.run(make_config(tmp_path), study_stages([]), ["nope"])


def test_named_datasets_from_the_command_line():
    cfg = config_lib.apply_overrides(
        config_lib.load_config("tiny"),
        ["datasets.bad_medical.source=/d/bad.jsonl.gz", "datasets.bad_medical.role=inducing",
         "datasets.bad_medical.pair=good_medical", "datasets.good_medical.source=/d/good.jsonl.gz",
         "datasets.good_medical.role=control"],
    )  # fmt: skip
    assert cfg.datasets["bad_medical"].source == "/d/bad.jsonl.gz"
    assert cfg.datasets["bad_medical"].pair == "good_medical"
    assert cfg.datasets["good_medical"].role == "control"
    with pytest.raises(config_lib.ConfigError, match=r"'datasets.x.rol' \(did you mean 'datasets.x.role'\?\)"):
        config_lib.apply_overrides(cfg, ["datasets.x.rol=control"])
    with pytest.raises(config_lib.ConfigError, match="is not one of inducing, control, harmful, harmless"):
        config_lib.apply_overrides(cfg, ["datasets.x.role=evil"])
    data = json.loads(json.dumps(config_lib.to_dict(cfg)))
    assert config_lib.from_dict(config_lib.ExperimentConfig, data) == cfg


def test_arch_and_checkpoint_together_are_refused():
    cfg = config_lib.apply_overrides(config_lib.load_config("tiny"), ["model.checkpoint=/nonexistent"])
    with pytest.raises(config_lib.ConfigError, match="model.arch and model.checkpoint=/nonexistent are both set"):
        config_lib.resolve_checkpoint(cfg)


@pytest.mark.parametrize(
    "args, message",
    [
        (["--stages=foo"], "config error: unknown stages ['foo']"),
        (["--config.model.checkpoint=/nonexistent"], "model.arch and model.checkpoint=/nonexistent are both set"),
    ],
)
def test_failed_invocations_leave_config_json_alone(tmp_path, args, message):
    (tmp_path / "config.json").write_text("{}\n")
    result = subprocess.run(
        [sys.executable, "-m", "emjax.main", f"--run_dir={tmp_path}", *args],
        capture_output=True, text=True, timeout=120, env=os.environ | {"JAX_PLATFORMS": "cpu"},
    )  # fmt: skip
    assert result.returncode != 0
    assert message in result.stderr and "Traceback" not in result.stderr
    assert (tmp_path / "config.json").read_text() == "{}\n"


def test_weights_are_fingerprinted_by_size_mtime_and_header(tmp_path):
    import numpy as np

    from emjax import artifacts

    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    artifacts.write_safetensors(ckpt / "model.safetensors", {"w": np.zeros((4, 4), np.float32)})
    before = artifacts.fingerprint(ckpt, hash_contents_below=0)
    assert artifacts.fingerprint(ckpt, hash_contents_below=0) == before
    artifacts.write_safetensors(ckpt / "model.safetensors", {"v": np.ones((4, 4), np.float32)})  # same size
    assert artifacts.fingerprint(ckpt, hash_contents_below=0) != before
    small = artifacts.fingerprint(ckpt)  # small files: by content, whatever their mtime
    os.utime(ckpt / "model.safetensors", ns=(1, 1))
    assert artifacts.fingerprint(ckpt) == small


def test_a_failed_write_names_the_path(tmp_path):
    from emjax import artifacts

    with pytest.raises(OSError, match=f"cannot write {tmp_path}/missing/x.json"):
        artifacts.write_json(tmp_path / "missing" / "x.json", {"a": 1})


def strict_loads(text: str):
    """A JSON parser that rejects NaN and +-Infinity, as JSON.parse does."""

    def refuse(constant):
        raise ValueError(f"not JSON: {constant}")

    return json.loads(text, parse_constant=refuse)


def test_json_artifacts_are_strict_json_with_undefined_as_null(tmp_path):
    import numpy as np

    from emjax import artifacts

    value = {
        "rate": float("nan"), "low": -float("inf"), "ok": 0.25, "count": np.int64(3), "f32": np.float32(0.5),
        "nested": [{"p": np.float32("nan"), "ci": (0.1, float("inf"))}], "array": np.array([1.0, np.nan]),
        "flag": np.bool_(True), "path": tmp_path, "by_layer": {np.int64(6): 1.5},
    }  # fmt: skip
    artifacts.write_json(tmp_path / "x.json", value)
    assert strict_loads((tmp_path / "x.json").read_text()) == {
        "rate": None, "low": None, "ok": 0.25, "count": 3, "f32": 0.5,
        "nested": [{"p": None, "ci": [0.1, None]}], "array": [1.0, None], "flag": True, "path": str(tmp_path),
        "by_layer": {"6": 1.5},
    }  # fmt: skip
    # The same holds for JSON lines (training metrics) written with artifacts.dumps.
    assert strict_loads(artifacts.dumps({"loss": float("nan")})) == {"loss": None}
