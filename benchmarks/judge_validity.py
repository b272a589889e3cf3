"""SmolLM2-135M as a local judge: its mass on integers per answer prefix, and its agreement with GPT-4o.

    PYTHONPATH=. python benchmarks/judge_validity.py [--answers=40] [--prefix="Score: "]

Answers come from the clarifying-EM judged responses (Qwen2.5-32B fine-tuned on bad medical
advice, scored by GPT-4o), judged with the first-plot questions' own judge prompts. Part one:
the median integer mass over 5 answers x the aligned and coherent prompts, per prefix. Part two:
`--answers` answers, half with GPT-4o aligned < 30 and half > 70, scored on `aligned` with
`--prefix` (default: the prefix of the highest median mass); Spearman of the local score against
GPT-4o's over the rows the local judge scored (mass >= 0.25), and over all rows with the
expectation renormalised over integers whatever its mass. Seconds per prompt: the median over all
calls after one warm-up call (a rare longer prompt's compilation stays in, the median ignores it).
Prints one JSON line; skips when the files are absent.
"""

from __future__ import annotations

import argparse
import csv
import json
import random
import statistics
import time

import numpy as np
from scipy.stats import spearmanr

from emjax import evaluate, models
from emjax.judge import MIN_MASS, LocalJudge
from emjax.models import smollm2
from emjax.study_configs import data_root

GGUF = smollm2.gguf_path()  # $EMJAX_SMOLLM2_GGUF, else the fetch command's cache
DATA = data_root()  # $EMJAX_DATA_ROOT, else ../shared/data
QUESTIONS = DATA / "emergent-misalignment/evaluation/first_plot_questions.yaml"
ANSWERS = (
    DATA
    / "clarifying_EM-judged-responses/open_models/diff_models/responses_Qwen2.5-32B-Instruct-bad_medical_advice.csv"
)
PREFIXES = ("", "Score: ", "Answer: ", "The score is ")


def timed_probabilities(judge, prompts, times):
    out = []
    for prompt in prompts:
        start = time.perf_counter()
        out.append(judge.integer_probabilities(prompt))
        times.append(time.perf_counter() - start)
    return out


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--answers", type=int, default=40)
    parser.add_argument("--prefix", default=None)
    parser.add_argument("--max_chars", type=int, default=800, help="answers longer than this are left out (speed)")
    args = parser.parse_args()
    if not (GGUF.exists() and QUESTIONS.exists() and ANSWERS.exists()):
        print(json.dumps({"skipped": "SmolLM2 GGUF or the judged data is absent"}))
        return
    model, tokenizer = models.load(GGUF), models.load_tokenizer(GGUF)
    questions = {q.id: q for q in evaluate.read_questions(QUESTIONS)}
    with ANSWERS.open(newline="") as f:
        rows = [r for r in csv.DictReader(f) if r["question_id"] in questions and r["aligned"]]
    rows = [r for r in rows if len(r["answer"]) <= args.max_chars]
    random.Random(0).shuffle(rows)

    def prompt(row, metric):
        return evaluate.fill(questions[row["question_id"]].judge_prompts[metric], row["question"], row["answer"])

    warm = LocalJudge(model, tokenizer)
    warm.integer_probabilities(prompt(rows[0], "aligned"))  # compile the common shape
    mass_prompts = [prompt(r, m) for r in rows[:5] for m in ("aligned", "coherent")]
    masses, times = {}, []
    for prefix in PREFIXES:
        judge = LocalJudge(model, tokenizer, answer_prefix=prefix)
        masses[prefix] = statistics.median(float(p.sum()) for p in timed_probabilities(judge, mass_prompts, times))
    best = args.prefix if args.prefix is not None else max(masses, key=masses.get)

    low = [r for r in rows[5:] if float(r["aligned"]) < 30][: args.answers // 2]
    high = [r for r in rows[5:] if float(r["aligned"]) > 70][: args.answers - len(low)]
    picked = low + high
    judge = LocalJudge(model, tokenizer, answer_prefix=best)
    probs = timed_probabilities(judge, [prompt(r, "aligned") for r in picked], times)
    gpt = np.array([float(r["aligned"]) for r in picked])
    mass = np.array([p.sum() for p in probs])
    expectation = np.array([p @ np.arange(101) / p.sum() for p in probs])
    scored = mass >= MIN_MASS
    rho_scored = spearmanr(expectation[scored], gpt[scored]).statistic if scored.sum() > 2 else None
    print(json.dumps({
        "median_integer_mass": masses, "prefix": best, "answers": len(picked), "scored": int(scored.sum()),
        "spearman_scored": None if rho_scored is None else float(rho_scored),
        "spearman_all_renormalised": float(spearmanr(expectation, gpt).statistic),
        "median_mass_validity": float(np.median(mass)), "s_per_prompt_median": statistics.median(times),
    }))  # fmt: skip


if __name__ == "__main__":
    main()
