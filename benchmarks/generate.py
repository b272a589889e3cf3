"""Sampling throughput: emjax.generate vs transformers' generate, same machine, one run.

    python benchmarks/generate.py --preset=cpu-gemma2      # CPU: small Gemma-2 shapes, fp32
    python benchmarks/generate.py --preset=gemma2-2b       # GPU: Gemma-2-2B shapes, bf16
    python benchmarks/generate.py --preset=gemma2-2b --side=peer   # one side in its own process (gpu.sh)

Both sides get random weights of the same shapes, the same left-padded prompts
of mixed lengths and decode exactly `new` tokens each (no stop id, so the work
is equal), at temperature 1, top_p 1. Timed after one warm-up call (emjax's
compile; a short one for transformers, which compiles nothing). Reported:
answers/s and new tokens/s, and emjax's first call (compile included).
Target: >= 5x transformers.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import jax
import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from bench_rows import emit, missing_module, skip_peer  # noqa: E402
from forward import PRESETS as FORWARD_PRESETS  # noqa: E402
from forward import add_side_argument  # noqa: E402

import emjax.models  # noqa: E402
from emjax.generate import generate  # noqa: E402

PRESETS = {
    "tiny": dict(config=FORWARD_PRESETS["tiny"]["config"], batch=4, prompt=(3, 9), new=8, dtype="float32"),  # gpu.sh
    "cpu-gemma2": dict(
        config=dict(
            model_type="gemma2", vocab_size=32000, hidden_size=512, intermediate_size=2048, num_hidden_layers=8,
            num_attention_heads=8, num_key_value_heads=4, head_dim=64, sliding_window=128, query_pre_attn_scalar=64,
        ),
        batch=16, prompt=(20, 60), new=64, dtype="float32",
    ),
    "gemma2-2b": dict(
        config=dict(
            model_type="gemma2", vocab_size=256000, hidden_size=2304, intermediate_size=9216, num_hidden_layers=26,
            num_attention_heads=8, num_key_value_heads=4, head_dim=256, sliding_window=4096,
            query_pre_attn_scalar=256,
        ),
        batch=64, prompt=(40, 120), new=256, dtype="bfloat16",
    ),
}  # fmt: skip


def prompts_for(p) -> list[list[int]]:
    rng = np.random.RandomState(0)
    low, high = p["prompt"]
    return [list(rng.randint(3, p["config"]["vocab_size"], rng.randint(low, high))) for _ in range(p["batch"])]


def bench_emjax(p, prompts) -> tuple[float, float]:
    """(seconds of a timed call, seconds of the first call, compile included)."""
    model = emjax.models.build(p["config"], seed=0, dtype=p["dtype"])
    run = lambda: generate(model, prompts, max_new_tokens=p["new"], seed=0, batch_size=len(prompts))  # noqa: E731
    start = time.perf_counter()
    run()
    first = time.perf_counter() - start
    start = time.perf_counter()
    out = run()
    seconds = time.perf_counter() - start
    assert all(len(o) == p["new"] for o in out)
    return seconds, first


def bench_transformers(p, prompts) -> tuple[float, str]:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    device = "cuda" if torch.cuda.is_available() else "cpu"
    config = AutoConfig.for_model(**p["config"])
    with torch.device(device):  # random weights made on the device, not on the CPU
        model = AutoModelForCausalLM.from_config(config).to(dtype=getattr(torch, p["dtype"])).eval()
    length = max(map(len, prompts))
    ids = torch.tensor([[0] * (length - len(q)) + q for q in prompts], device=device)
    mask = torch.tensor([[0] * (length - len(q)) + [1] * len(q) for q in prompts], device=device)

    def run(new):
        with torch.inference_mode():
            model.generate(
                ids, attention_mask=mask, max_new_tokens=new, min_new_tokens=new, do_sample=True,
                temperature=1.0, top_p=1.0, top_k=0, pad_token_id=0,
            )  # fmt: skip
        if device == "cuda":
            torch.cuda.synchronize()

    run(4)  # warm-up: CUDA context, kernels, allocator
    start = time.perf_counter()
    run(p["new"])
    return time.perf_counter() - start, model.config._attn_implementation


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", choices=sorted(PRESETS), default="cpu-gemma2")
    add_side_argument(parser)
    args = parser.parse_args()
    p = PRESETS[args.preset]
    prompts = prompts_for(p)
    answers = p["batch"]
    rows = []
    if args.side != "peer":
        seconds, first = bench_emjax(p, prompts)
        emit(bench="generate", preset=args.preset, side="emjax", run="emjax generate first call", seconds=first)
        emit(bench="generate", preset=args.preset, side="emjax", run="emjax generate", seconds=seconds,
             tokens=answers * p["new"])  # fmt: skip
        rows.append(("emjax generate (while_loop, KV cache)", seconds))
        print(f"emjax first call (compile included): {first:.1f} s")
    missing = missing_module("torch", "transformers")
    if args.side != "emjax" and missing:
        skip_peer("generate", args.preset, missing)
    elif args.side != "emjax":
        seconds, attention = bench_transformers(p, prompts)
        emit(bench="generate", preset=args.preset, side="peer", run="transformers generate", seconds=seconds,
             tokens=answers * p["new"])  # fmt: skip
        rows.append((f"transformers generate ({attention})", seconds))
    if args.side != "peer":
        print(f"device: {jax.devices()[0].device_kind} ({jax.default_backend()}), jax {jax.__version__}")
    print(f"preset {args.preset}: {p['batch']} prompts of {p['prompt'][0]}-{p['prompt'][1]} tokens, "
          f"{p['new']} new tokens each, {p['dtype']}")  # fmt: skip
    print(f"| {'run':<42} | {'s':>7} | {'answers/s':>9} | {'tokens/s':>9} |")
    print(f"|{'-' * 44}|{'-' * 9}|{'-' * 11}|{'-' * 11}|")
    for name, seconds in rows:
        print(f"| {name:<42} | {seconds:>7.2f} | {answers / seconds:>9.2f} | {answers * p['new'] / seconds:>9.0f} |")
    if len(rows) == 2:
        print(f"speed-up: {rows[1][1] / rows[0][1]:.2f}x")


if __name__ == "__main__":
    main()
