"""Nothing damaged is trusted: finished outputs re-checked, readers' keys on their inputs' contents,
checked CSV reads, the config checked before any stage runs. Small stages of the test's own."""

import hashlib
import json
import logging
import os
import re
import shutil
import types

import pytest

from emjax import artifacts, evaluate, pipeline
from emjax import config as config_lib
from emjax.pipeline import Stage
from emjax.stages import STAGES
from emjax.stages import derivation as derivation_stage
from emjax.stages import mitigate as mitigate_stage


def make_config(tmp_path, **datasets):
    cfg = config_lib.ExperimentConfig(name="integrity", run_dir=str(tmp_path / "run"))
    cfg.datasets = {name: config_lib.DatasetConfig(source=str(src)) for name, src in datasets.items()}
    return cfg


def stages(calls: list, stamp: dict):
    """write: per dataset, its text and a stamp that changes each time the variant runs (so a redone
    variant's contents differ); total: reads every variant's files."""

    def write(ctx, out, variant):
        calls.append(f"write/{variant}")
        stamp[variant] = stamp.get(variant, 0) + 1
        (out / "text.txt").write_text(open(ctx.config.datasets[variant].source).read())
        (out / "nested").mkdir()
        (out / "nested" / "stamp.txt").write_text(str(stamp[variant]))
        return {"runs": stamp[variant]}

    def total(ctx, out):
        calls.append("total")
        seen = {v: (ctx.output("write", v) / "nested" / "stamp.txt").read_text() for v in ctx.variants("write")}
        (out / "seen.json").write_text(json.dumps(seen))
        return {"seen": seen}

    return [
        Stage(
            "write", write, sections=("datasets.{variant}",), variants=lambda cfg: sorted(cfg.datasets),
            external=lambda cfg, variant: {"data": cfg.datasets[variant].source},
        ),  # fmt: skip
        Stage("total", total, inputs=("write",)),
    ]


@pytest.fixture
def study(tmp_path):
    (tmp_path / "a.txt").write_text("alpha\n")
    (tmp_path / "b.txt").write_text("beta\n")
    cfg = make_config(tmp_path, a=tmp_path / "a.txt", b=tmp_path / "b.txt")
    calls, stamp = [], {}
    pipeline.run(cfg, stages(calls, stamp), ["write", "total"])
    calls.clear()
    return cfg, tmp_path / "run", calls, stamp


def rerun(cfg, calls, stamp, selected=("write", "total")):
    calls.clear()
    pipeline.run(cfg, stages(calls, stamp), list(selected))
    return list(calls)


def test_a_manifest_records_each_outputs_size_and_content_hash(study):
    cfg, run, calls, stamp = study
    manifest = json.loads((run / "write" / "a" / "manifest.json").read_text())
    text = run / "write" / "a" / "text.txt"
    recorded = manifest["outputs"]
    assert set(recorded) == {"text.txt", "nested/stamp.txt"}
    assert recorded["text.txt"]["size"] == 6 == text.stat().st_size
    assert recorded["text.txt"]["sha256"] == hashlib.sha256(b"alpha\n").hexdigest()


@pytest.mark.parametrize(
    "damage, named",
    [
        (lambda f: f.write_text("alphA\n"), "changed (same size, other content)"),  # one character
        (lambda f: f.write_text("alp"), "changed size (6 -> 3 bytes)"),  # cut
        (lambda f: f.unlink(), "is missing"),
    ],
    ids=["edited", "truncated", "deleted"],
)
def test_damaged_outputs_are_redone_with_a_warning_naming_the_file(study, caplog, damage, named):
    cfg, run, calls, stamp = study
    text = run / "write" / "a" / "text.txt"
    damage(text)
    with caplog.at_level(logging.WARNING, logger="emjax.pipeline"):
        ran = rerun(cfg, calls, stamp)
    assert ran == ["write/a", "total"]  # the redone variant's contents differ (its stamp): its reader reruns
    assert text.read_text() == "alpha\n"
    warning = " ".join(r.getMessage() for r in caplog.records if r.levelno == logging.WARNING)
    assert f"{text} {named}" in warning and "redoing it" in warning
    seen = json.loads((run / "total" / "seen.json").read_text())
    assert seen == {"a": "2", "b": "1"}


def test_an_edited_manifest_is_damage_too(study):
    cfg, run, calls, stamp = study
    path = run / "write" / "b" / "manifest.json"
    manifest = json.loads(path.read_text())
    path.write_text(json.dumps(manifest | {"runs": 7}))
    assert rerun(cfg, calls, stamp) == ["write/b", "total"]


def test_an_unchanged_rerun_reads_no_output_and_a_touched_file_is_hashed_once(study, monkeypatch):
    cfg, run, calls, stamp = study
    hashed = []
    real_hash = artifacts.content_hash
    monkeypatch.setattr(artifacts, "content_hash", lambda path, **kw: hashed.append(str(path)) or real_hash(path))
    assert rerun(cfg, calls, stamp) == []
    assert not [p for p in hashed if p.startswith(str(run))]  # data files outside the run are fingerprinted, as before
    # Same contents, a new mtime (a copy, a touch): hashed once, found intact, recorded again.
    os.utime(run / "write" / "a" / "text.txt", ns=(1, 1))
    hashed.clear()
    assert rerun(cfg, calls, stamp) == []
    assert [p for p in hashed if p.startswith(str(run))] == [str(run / "write" / "a" / "text.txt")]
    hashed.clear()
    assert rerun(cfg, calls, stamp) == []
    assert not [p for p in hashed if p.startswith(str(run))]


def test_a_reader_of_damaged_outputs_outside_the_run_says_which_stage_to_add(study):
    cfg, run, calls, stamp = study
    (run / "write" / "b" / "nested" / "stamp.txt").write_text("9")
    with pytest.raises(pipeline.DamagedOutputError) as error:
        rerun(cfg, calls, stamp, selected=["total"])
    message = str(error.value)
    assert str(run / "write" / "b" / "nested" / "stamp.txt") in message and "add 'write' to --stages" in message
    assert calls == []


def test_a_readers_key_holds_its_inputs_contents(study):
    cfg, run, calls, stamp = study
    # The variant is redone by hand (its folder deleted): same key, other contents; the reader follows.
    shutil.rmtree(run / "write" / "a")
    assert rerun(cfg, calls, stamp) == ["write/a", "total"]
    assert json.loads((run / "total" / "seen.json").read_text())["a"] == "2"


# ---------------------------------------------------------------------------- readers validate what they read


def write_scores(path, rows, columns=evaluate.SCORE_COLUMNS):
    evaluate._write_rows(path, rows, columns)


def score_row(i):
    return {"question": f"q{i}", "answer": f"a{i}", "question_id": "q", "aligned": 10 + i, "coherent": 90}


@pytest.mark.parametrize(
    "damage, problem",
    [
        (lambda text: text[: text.rstrip().rfind(",")], "the last line is cut"),
        (lambda text: text.replace(",coherent,", ",coherence,", 1), "no column 'coherent'"),
        (lambda text: text.rstrip("\r\n").rsplit("\r\n", 1)[0] + "\r\nq9,a9\r\n", "line 4 has 2 fields, the header"),
        (lambda text: "", "empty (no header line)"),
    ],
    ids=["cut-last-line", "missing-column", "short-row", "empty"],
)
def test_damaged_csvs_are_one_line_errors_naming_file_and_problem(tmp_path, damage, problem):
    path = tmp_path / "evaluate" / "mix-none-s0" / "scores.csv"
    path.parent.mkdir(parents=True)
    write_scores(path, [score_row(i) for i in range(3)])
    assert [float(r["aligned"]) for r in mitigate_stage.scores_of(ctx_at(tmp_path), "mix-none-s0")] == [10, 11, 12]
    path.write_bytes(damage(path.read_bytes().decode()).encode())
    with pytest.raises(artifacts.DamagedFileError) as error:
        mitigate_stage.scores_of(ctx_at(tmp_path), "mix-none-s0")
    message = str(error.value)
    assert message.startswith(f"{path}: ") and problem in message and "\n" not in message


def ctx_at(root, config=None):
    return types.SimpleNamespace(output=lambda stage, variant=None: root / stage / variant, config=config)


def test_derivation_reads_the_base_answers_checked(tmp_path):
    path = tmp_path / "evaluate" / "base" / "answers.csv"
    path.parent.mkdir(parents=True)
    evaluate._write_rows(path, [{"question": "q", "question_id": "q"}], ("question", "question_id"))  # no answer
    with pytest.raises(artifacts.DamagedFileError, match=f"{path}: no column 'answer'"):
        derivation_stage.probe_rows(ctx_at(tmp_path))


def test_published_csvs_without_a_final_line_end_still_read(tmp_path):
    path = tmp_path / "judged.csv"
    path.write_text("question,answer,question_id,aligned,coherent\nq,a,x,10,90")
    assert evaluate.summarize(path)["overall"]["n"] == 1


# ---------------------------------------------------------------------------- the config, before any stage runs


def tiny(tmp_path, *overrides):
    cfg = config_lib.apply_overrides(config_lib.load_config("tiny"), list(overrides))
    cfg.run_dir = str(tmp_path / "run")
    return cfg


@pytest.mark.parametrize(
    "override, message",
    [
        ("datasets.bad_advice.pair=misaligned_answers",
         "pair='misaligned_answers' names a dataset whose role is harmful, not control"),
        ("datasets.bad_advice.pair=good_advise", "names no dataset (did you mean 'good_advice'?)"),
        ("datasets.good_advice.pair=bad_advice", "only an inducing dataset has a pair (datasets.good_advice.role"),
        ("mitigate.inducing=good_advice", "mitigate.inducing='good_advice' is not a dataset with a pair"),
        ("mitigate.layer=7", "mitigate.layer=7 is not one of sae.layers"),
    ],
)
def test_cross_references_are_checked_at_parse_time(tmp_path, override, message):
    from emjax import main

    with pytest.raises(config_lib.ConfigError, match=re.escape(message)):
        main.resolve_config("tiny", [override], str(tmp_path / "run"))
    with pytest.raises(config_lib.ConfigError):
        pipeline.run(tiny(tmp_path, override), STAGES)
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize(
    "override, field",
    [
        ("datasets.bad_advice.source=/nonexistent/bad.jsonl", "datasets.bad_advice.source=/nonexistent/bad.jsonl"),
        ("data.source=/nonexistent/chats.jsonl", "data.source=/nonexistent/chats.jsonl"),
        ("evaluate.questions=/nonexistent/q.yaml", "evaluate.questions=/nonexistent/q.yaml"),
    ],
)
def test_a_missing_data_file_is_reported_before_the_first_stage(tmp_path, override, field):
    with pytest.raises(config_lib.ConfigError, match=f"no such file: .*{field}.*nothing has run"):
        pipeline.run(tiny(tmp_path, override), STAGES)
    assert not (tmp_path / "run").exists()


def test_a_failed_start_leaves_no_empty_partial_folder(tmp_path):
    def fails_at_once(ctx, out):
        raise config_lib.ConfigError("bad input")

    def fails_later(ctx, out):
        (out / "chunk0.npy").write_bytes(b"x")  # work a rerun resumes from
        raise KeyboardInterrupt

    cfg = make_config(tmp_path)
    with pytest.raises(config_lib.ConfigError):
        pipeline.run(cfg, [Stage("early", fails_at_once)], ["early"])
    assert not (tmp_path / "run" / "early.partial").exists()
    with pytest.raises(KeyboardInterrupt):
        pipeline.run(cfg, [Stage("late", fails_later)], ["late"])
    assert (tmp_path / "run" / "late.partial" / "chunk0.npy").exists()
