"""The probe judge on SmolLM2-135M: its agreement with GPT-4o on another model's answers, and its cost.

    PYTHONPATH=. python benchmarks/probe_judge.py [--layer=15] [--per_file=200]

Fits emjax.probe_judge on the clarifying-EM judged answers of five models (configs/smollm2_135m.py's
judge.probe_data), validates on the sixth (Qwen2.5-32B bad medical advice), and prints one JSON line:
the validation (Spearman, Pearson, mean absolute error per metric, AUROC of misaligned) and the
seconds to fit (embedding every answer is nearly all of it). Skips when the files are absent.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from emjax import config as config_lib
from emjax import models, probe_judge
from emjax.models import smollm2


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--layer", type=int, default=15)
    parser.add_argument("--per_file", type=int, default=200)
    args = parser.parse_args()
    judge = config_lib.load_config("smollm2_135m").judge
    files = [smollm2.gguf_path(), *map(Path, judge.probe_data), Path(judge.probe_heldout)]
    if not all(f.is_file() for f in files):
        print(json.dumps({"skipped": "SmolLM2 GGUF or judged data absent"}))
        return
    model, tokenizer = models.load(files[0], dtype="float32"), models.load_tokenizer(files[0])
    start = time.perf_counter()
    probe = probe_judge.fit(
        model, tokenizer, judge.probe_data, heldout_csv=judge.probe_heldout, layer=args.layer, per_file=args.per_file
    )
    seconds = time.perf_counter() - start
    print(json.dumps({"layer": args.layer, "per_file": args.per_file, "fit_seconds": round(seconds, 1),
                      **{k: v for k, v in probe.validation.items() if k not in ("train_files",)}}))  # fmt: skip


if __name__ == "__main__":
    main()
