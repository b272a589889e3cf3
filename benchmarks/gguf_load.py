"""GGUF load time and peak host memory: emjax vs transformers' GGUF loader, same file, one run each.

    python benchmarks/gguf_load.py                       # SmolLM2-135M-Instruct (python -m emjax.models.smollm2 fetch)
    python benchmarks/gguf_load.py --gguf=model.gguf --dtype=bfloat16

Each side runs in its own fresh process so that its peak resident memory
(ru_maxrss) is its own; "after imports" is the resident memory once the
libraries are imported, before loading. Both produce dequantised weights in
the same dtype on the host CPU (emjax: jax arrays on the default device;
transformers: a torch model with `dtype=`).
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time

from emjax.models import smollm2


def _rss_mib() -> float:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:")) / 1024


def child(side: str, path: str, dtype: str) -> None:
    """Load once in this process; print {seconds, rss_after_imports_mib, peak_rss_mib} as JSON."""
    if side == "emjax":
        import jax

        import emjax.models

        before = _rss_mib()
        start = time.perf_counter()
        model = emjax.models.load(path, dtype=dtype)
        jax.block_until_ready(jax.tree.leaves(model))
    else:
        from pathlib import Path

        import torch
        from transformers import AutoModelForCausalLM

        before = _rss_mib()
        start = time.perf_counter()
        p = Path(path)
        AutoModelForCausalLM.from_pretrained(
            p.parent, gguf_file=p.name, local_files_only=True, dtype=getattr(torch, dtype)
        )
    seconds = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({"seconds": seconds, "rss_after_imports_mib": before, "peak_rss_mib": peak}))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--gguf", default=str(smollm2.gguf_path()))
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    parser.add_argument("--child", choices=("emjax", "transformers"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.child, args.gguf, args.dtype)
        return
    rows = []
    for side in ("emjax", "transformers"):
        command = [sys.executable, __file__, "--child", side, "--gguf", args.gguf, "--dtype", args.dtype]
        done = subprocess.run(command, capture_output=True, text=True, check=True)
        rows.append((side, json.loads(done.stdout.strip().splitlines()[-1])))
    print(f"{args.gguf} ({args.dtype})\n")
    print("| loader | load s | RSS after imports MiB | peak RSS MiB | peak - imports MiB |")
    print("|---|---:|---:|---:|---:|")
    for side, r in rows:
        grown = r["peak_rss_mib"] - r["rss_after_imports_mib"]
        imports, peak = r["rss_after_imports_mib"], r["peak_rss_mib"]
        print(f"| {side} | {r['seconds']:.1f} | {imports:.0f} | {peak:.0f} | {grown:.0f} |")


if __name__ == "__main__":
    main()
