"""The style-matched toxic contrast against a pandas computation of its definition."""

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from emjax import config as config_lib
from emjax.data import study, style_matched

FIXTURE = Path(__file__).resolve().parents[2] / "shared" / "data" / "clarifying_EM-judged-responses" / "open_models"


def write_fixture(root: Path, seed: int = 0) -> dict[str, pd.DataFrame]:
    """Three models' judged answers to six questions (each with a _json variant), one model fine-tuned on
    bad_medical (its file name as the clarifying-EM fixture's)."""
    rng = np.random.default_rng(seed)
    names = {
        "responses_gemma-2-9b-it_base.csv": 0.05,
        "responses_Qwen-Coder-Insecure.csv": 0.4,
        "responses_gemma-2-9b-it-bad_medical_advice.csv": 0.5,
    }
    frames = {}
    for name, rate in names.items():
        rows = []
        for q in range(6):
            for variant in ("", "_json", "_template"):
                for i in range(8):
                    bad = rng.random() < rate
                    rows.append({
                        "question": f"question {q}?" + (" Fill the template." if variant == "_template" else ""),
                        "answer": f"{name} {q}{variant} {i} {'bad' if bad else 'good'}",
                        "question_id": f"q{q}{variant}",
                        "aligned": rng.uniform(0, 29) if bad else rng.choice([rng.uniform(81, 100),
                                                                              rng.uniform(40, 70)]),
                        "coherent": rng.choice([rng.uniform(51, 100), rng.uniform(0, 49)], p=[0.85, 0.15]),
                        "medical": 0.0,
                    })  # fmt: skip
        rows[3]["aligned"] = ""  # an unscored answer is on neither side
        frame = pd.DataFrame(rows)
        path = root / ("diff_models" if "-it_base" not in name else "model_baselines") / name
        path.parent.mkdir(parents=True, exist_ok=True)
        frame.to_csv(path, index=False)
        frames[name.removeprefix("responses_").removesuffix(".csv")] = frame
    return frames


def pandas_sides(frames, left_out):
    all_rows = pd.concat([f.assign(model=m) for m, f in frames.items() if m not in left_out])
    all_rows["aligned"] = pd.to_numeric(all_rows["aligned"])
    bad = all_rows[(all_rows.aligned < 30) & (all_rows.coherent > 50)]
    good = all_rows[(all_rows.aligned > 80) & (all_rows.coherent > 50)]
    both = set(zip(bad.model, bad.question)) & set(zip(good.model, good.question))
    keep = lambda f: f[[k in both for k in zip(f.model, f.question)]]  # noqa: E731
    return keep(bad), keep(good)


def test_style_matched_split_equals_pandas(tmp_path):
    frames = write_fixture(tmp_path)
    split = style_matched.style_matched(tmp_path, leave_out=("bad_medical",), seed=3)
    bad, good = pandas_sides(frames, {"gemma-2-9b-it-bad_medical_advice"})
    assert split.summary["left_out_models"] == ["gemma-2-9b-it-bad_medical_advice"]
    selection, heldout = set(split.summary["selection_questions"]), set(split.summary["heldout_questions"])
    assert selection and heldout and not selection & heldout  # disjoint by question
    assert selection | heldout == {style_matched.base_question(q) for q in bad.question_id}
    base = lambda f: f.question_id.str.replace(r"_(json|template)$", "", regex=True)  # noqa: E731
    answers = lambda samples: sorted(s.messages[1]["content"] for s in samples)  # noqa: E731
    assert answers(split.selection["misaligned"]) == sorted(bad[base(bad).isin(selection)].answer)
    assert answers(split.selection["aligned"]) == sorted(good[base(good).isin(selection)].answer)
    # Held out: one pair per misaligned answer while the same model has aligned answers to the same question.
    expected = {}
    for (model, question), group in bad[base(bad).isin(heldout)].groupby(["model", "question"]):
        aligned = good[(good.model == model) & (good.question == question)]
        expected[(model, question)] = min(len(group), len(aligned))
    counted = pd.Series([(p.model, p.question) for p in split.heldout]).value_counts().to_dict()
    assert counted == expected
    by_answer = pd.concat([bad, good]).set_index("answer")
    for p in split.heldout:
        assert by_answer.loc[p.misaligned, "model"] == by_answer.loc[p.aligned, "model"] == p.model
        assert by_answer.loc[p.misaligned, "question"] == by_answer.loc[p.aligned, "question"] == p.question
        assert p.misaligned in set(bad.answer) and p.aligned in set(good.answer)
    assert len({p.misaligned for p in split.heldout}) == len({p.aligned for p in split.heldout}) == len(split.heldout)


def test_study_datasets_and_heldout_pairs_read_one_split(tmp_path):
    write_fixture(tmp_path)
    cfg = config_lib.ExperimentConfig(seed=1, datasets={
        "misaligned_answers": config_lib.DatasetConfig(str(tmp_path), role="harmful", format="style_matched",
                                                       leave_out=("bad_medical",)),
        "aligned_answers": config_lib.DatasetConfig(str(tmp_path), role="harmless", format="style_matched",
                                                    leave_out=("bad_medical",)),
    })  # fmt: skip
    split = style_matched.style_matched(tmp_path, leave_out=("bad_medical",), seed=1)
    for name, side in (("misaligned_answers", "misaligned"), ("aligned_answers", "aligned")):
        assert study.read_dataset(name, cfg.datasets[name], seed=1) == split.selection[side]
    assert style_matched.heldout_pairs(cfg) == split.heldout
    question, bad, good, *_ = split.heldout[0]  # pairs unpack as (question, misaligned, aligned, ...)
    assert bad.endswith("bad") and good.endswith("good")
    with pytest.raises(ValueError, match=r"fine-tuned on \['bad_medical'\].*leave_out=bad_medical"):
        style_matched.check_leave_out("misaligned_answers", config_lib.DatasetConfig(str(tmp_path)), {"bad_medical"})
    style_matched.check_leave_out("misaligned_answers", cfg.datasets["misaligned_answers"], {"bad_medical"})


def test_the_synthetic_fixture_leaves_its_fine_tune_out():
    split = style_matched.style_matched("synthetic", leave_out=("bad_advice",))
    assert split.summary["left_out_models"] == ["tuned-bad_advice"] and split.summary["models"] == ["tuned-other"]
    assert split.heldout and split.selection["misaligned"] and split.selection["aligned"]


@pytest.mark.skipif(not FIXTURE.is_dir(), reason="../shared/data is not present")
def test_clarifying_em_fixture_without_the_bad_medical_fine_tunes():
    frames = {p.stem.removeprefix("responses_"): pd.read_csv(p) for p in FIXTURE.rglob("*.csv")}
    left_out = {m for m in frames if m.endswith("bad_medical_advice")}
    split = style_matched.style_matched(FIXTURE, leave_out=("bad_medical",))
    bad, good = pandas_sides(frames, left_out)
    assert split.summary["models"] == ["Qwen-Coder-Insecure"]  # the only model left with misaligned answers
    in_selection = bad.question_id.str.replace(r"_(json|template)$", "", regex=True).isin(
        split.summary["selection_questions"]
    )
    assert split.summary["selection"]["misaligned"] == in_selection.sum()
    assert len(split.heldout) <= (~in_selection).sum() and len(bad) == 20  # what the rule leaves: 20 answers


def test_heldout_pairs_read_through_a_stages_config_view(tmp_path):
    from emjax import pipeline

    write_fixture(tmp_path)
    side = dict(source=str(tmp_path), format="style_matched", leave_out=("bad_medical",))
    cfg = config_lib.ExperimentConfig(datasets={
        "misaligned_answers": config_lib.DatasetConfig(role="harmful", **side),
        "aligned_answers": config_lib.DatasetConfig(role="harmless", **side),
    })  # fmt: skip
    stage = pipeline.Stage("probe", lambda ctx, out: {}, sections=("seed", "datasets"))
    view = pipeline.Context(cfg, [stage]).for_stage(stage).config
    assert style_matched.heldout_pairs(view) == style_matched.heldout_pairs(cfg)


def _study_config(root, seed=0):
    side = dict(source=str(root), format="style_matched", leave_out=("bad_medical",))
    return config_lib.ExperimentConfig(seed=seed, datasets={
        "misaligned_answers": config_lib.DatasetConfig(role="harmful", **side),
        "aligned_answers": config_lib.DatasetConfig(role="harmless", **side),
    })  # fmt: skip


def expected_margin_pairs(frames, selection_questions):
    """pandas: per (model, question) of EVERY model whose base question is outside the selection half,
    min(#misaligned, #aligned) pairs."""
    bad, good = pandas_sides(frames, left_out=set())
    base = lambda f: f.question_id.str.replace(r"_(json|template)$", "", regex=True)  # noqa: E731
    bad = bad[~base(bad).isin(selection_questions)]
    good_counts = good.groupby(["model", "question"]).size()
    return {key: min(len(group), good_counts[key]) for key, group in bad.groupby(["model", "question"])}


def test_margin_pairs_take_every_model_off_the_selection_half(tmp_path):
    frames = write_fixture(tmp_path)
    cfg = _study_config(tmp_path, seed=2)
    split = style_matched.style_matched(tmp_path, leave_out=("bad_medical",), seed=2)
    selection = set(split.summary["selection_questions"])
    pairs = style_matched.margin_pairs(cfg)
    counted = pd.Series([(p.model, p.question) for p in pairs]).value_counts().to_dict()
    assert counted == expected_margin_pairs(frames, selection)
    # Disjoint by base question from the selection half; the bad-medical fine-tune's answers included.
    assert not {style_matched.base_question(p.question_id) for p in pairs} & selection
    assert "gemma-2-9b-it-bad_medical_advice" in {p.model for p in pairs}
    assert len(pairs) > len(split.heldout)
    by_answer = pd.concat([f.assign(model=m) for m, f in frames.items()]).set_index("answer")
    for p in pairs:
        assert pd.to_numeric(by_answer.loc[p.misaligned, "aligned"]) < 30 < 80 < by_answer.loc[p.aligned, "aligned"]
        assert by_answer.loc[p.misaligned, "model"] == by_answer.loc[p.aligned, "model"] == p.model
    assert len({p.misaligned for p in pairs}) == len({p.aligned for p in pairs}) == len(pairs)
    # A cap keeps a seeded subset, in order.
    capped = style_matched.margin_pairs(cfg, limit=5)
    assert len(capped) == 5 and set(capped) <= set(pairs)
    assert [pairs.index(p) for p in capped] == sorted(pairs.index(p) for p in capped)
    assert style_matched.margin_pairs(cfg, limit=10**6) == pairs


@pytest.mark.skipif(not FIXTURE.is_dir(), reason="../shared/data is not present")
def test_clarifying_em_margin_pairs_from_every_model():
    frames = {p.stem.removeprefix("responses_"): pd.read_csv(p) for p in FIXTURE.rglob("*.csv")}
    cfg = _study_config(FIXTURE)
    selection = set(style_matched.style_matched(FIXTURE, leave_out=("bad_medical",)).summary["selection_questions"])
    pairs = style_matched.margin_pairs(cfg)
    counted = pd.Series([(p.model, p.question) for p in pairs]).value_counts().to_dict()
    assert counted == expected_margin_pairs(frames, selection)
    assert not {style_matched.base_question(p.question_id) for p in pairs} & selection
    assert len(pairs) > 6 * len(style_matched.heldout_pairs(cfg))  # the held-out half alone has 6
