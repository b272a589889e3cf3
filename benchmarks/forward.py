"""Forward and residual-capture throughput: emjax vs Hugging Face transformers, same machine, one run.

    python benchmarks/forward.py --preset=cpu-gemma2          # also cpu-llama, cpu-gpt-oss
    python benchmarks/forward.py --preset=gemma2-2b           # GPU: bf16, 16 x 1024 tokens, capture layer 12
    python benchmarks/forward.py --preset=llama31-8b          # GPU: Llama-3.1-8B shapes
    python benchmarks/forward.py --preset=gpt-oss-20b-layers  # GPU: gpt-oss-20b shapes, 4 layers
    python benchmarks/forward.py --preset=gemma2-2b --side=peer  # one side only, in its own process (gpu.sh)

Both sides get random weights of the same shapes and dtype. Four rows:
full forward (logits) and capture at one layer with stop_at_layer, for each
library; transformers stops early the way users do it, by raising from a
forward hook after the captured block. MFU counts the matmul FLOPs actually
needed (projections, attention scores and values over the full square, the
routed experts only, the head when computed) against the dense-matmul rate
measured on this device in the same dtype in the same run.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from bench_rows import emit, missing_module, skip_peer  # noqa: E402

import emjax.models  # noqa: E402

GEMMA2_SMALL = dict(
    model_type="gemma2", vocab_size=32000, hidden_size=512, intermediate_size=2048, num_hidden_layers=8,
    num_attention_heads=8, num_key_value_heads=4, head_dim=64, sliding_window=128, query_pre_attn_scalar=64,
)  # fmt: skip
# A model small enough to check gpu.sh's plumbing on a CPU in seconds (EMJAX_GPU_SH_TINY=1); not a benchmark.
GEMMA2_TINY = dict(
    model_type="gemma2", vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
    num_attention_heads=4, num_key_value_heads=2, head_dim=16, sliding_window=16, query_pre_attn_scalar=16,
)  # fmt: skip
PRESETS = {
    "tiny": dict(config=GEMMA2_TINY, batch=2, seq=32, capture=0, dtype="float32"),
    "cpu-gemma2": dict(config=GEMMA2_SMALL, batch=4, seq=256, capture=4, dtype="float32"),
    "cpu-llama": dict(
        config=dict(
            model_type="llama", vocab_size=32000, hidden_size=512, intermediate_size=2048, num_hidden_layers=8,
            num_attention_heads=8, num_key_value_heads=4, head_dim=64,
            rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                          "original_max_position_embeddings": 8192},
        ),
        batch=4, seq=256, capture=4, dtype="float32",
    ),
    "cpu-gpt-oss": dict(
        config=dict(
            model_type="gpt_oss", vocab_size=32000, hidden_size=512, intermediate_size=512, num_hidden_layers=8,
            num_attention_heads=8, num_key_value_heads=4, head_dim=64, num_local_experts=16, num_experts_per_tok=4,
            sliding_window=128,
        ),
        batch=4, seq=256, capture=4, dtype="float32",
    ),
    "gemma2-2b": dict(
        config=dict(
            model_type="gemma2", vocab_size=256000, hidden_size=2304, intermediate_size=9216, num_hidden_layers=26,
            num_attention_heads=8, num_key_value_heads=4, head_dim=256, sliding_window=4096,
            query_pre_attn_scalar=256,
        ),
        batch=16, seq=1024, capture=12, dtype="bfloat16",
    ),
    "llama31-8b": dict(
        config=dict(
            model_type="llama", vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
            num_attention_heads=32, num_key_value_heads=8, head_dim=128, rope_theta=500000.0,
            rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                          "original_max_position_embeddings": 8192},
        ),
        batch=8, seq=1024, capture=15, dtype="bfloat16",
    ),
    "gpt-oss-20b-layers": dict(
        config=dict(
            model_type="gpt_oss", vocab_size=201088, hidden_size=2880, intermediate_size=2880, num_hidden_layers=4,
            num_attention_heads=64, num_key_value_heads=8, head_dim=64, num_local_experts=32,
            num_experts_per_tok=4, sliding_window=128,
        ),
        batch=8, seq=1024, capture=2, dtype="bfloat16",
    ),
}  # fmt: skip


@dataclasses.dataclass
class Row:
    name: str
    seconds: float
    tokens: int
    flops: float

    @property
    def tokens_per_s(self):
        return self.tokens / self.seconds


def matmul_flops(cfg: dict, batch: int, seq: int, layers: int, head: bool) -> float:
    d, f, h, g = (cfg[n] for n in ("hidden_size", "intermediate_size", "num_attention_heads", "num_key_value_heads"))
    k = cfg["head_dim"]
    tokens = batch * seq
    experts = cfg.get("num_experts_per_tok", 1)
    router = 2 * tokens * d * cfg.get("num_local_experts", 0)
    proj = 2 * tokens * (d * h * k * 2 + d * g * k * 2 + experts * 3 * d * f) + router
    attn = 2 * 2 * batch * seq * seq * h * k  # scores and values over the full (unmasked) square
    return layers * (proj + attn) + (2 * tokens * d * cfg["vocab_size"] if head else 0)


def timed(fn, repeats: int) -> float:
    fn()  # compile / warm up
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def measured_matmul_rate(dtype, n: int | None = None) -> float:
    """FLOP/s of one dense n x n x n matmul in `dtype` (n = 8192 on accelerators, 1024 on CPU)."""
    n = n or (1024 if jax.default_backend() == "cpu" else 8192)
    a = jnp.ones((n, n), dtype)
    f = jax.jit(lambda a: a @ a)
    return 2 * n**3 / timed(lambda: f(a).block_until_ready(), 5)


def bench_emjax(cfg, batch, seq, capture, dtype, repeats):
    model = emjax.models.build(cfg, seed=0, dtype=dtype)
    ids = jnp.asarray(np.random.RandomState(0).randint(0, cfg["vocab_size"], (batch, seq)))
    full = emjax.models.jit_forward(model)
    stop = emjax.models.jit_forward(model, capture=(capture,), stop_at_layer=capture + 1)
    layers = cfg["num_hidden_layers"]
    return [
        Row("emjax full forward", timed(lambda: full(ids).logits.block_until_ready(), repeats), batch * seq,
            matmul_flops(cfg, batch, seq, layers, head=True)),
        Row(f"emjax capture {capture} + stop", timed(lambda: stop(ids).captured[capture].block_until_ready(), repeats),
            batch * seq, matmul_flops(cfg, batch, seq, capture + 1, head=False)),
    ]  # fmt: skip


def bench_transformers(cfg, batch, seq, capture, dtype, repeats):
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    device = "cuda" if torch.cuda.is_available() else "cpu"
    config = AutoConfig.for_model(**cfg)
    with torch.device(device):  # random weights made on the device: a CPU init of billions of them takes minutes
        model = AutoModelForCausalLM.from_config(config).to(dtype=getattr(torch, dtype)).eval()
    ids = torch.randint(0, cfg["vocab_size"], (batch, seq), device=device)

    class Stop(Exception):
        pass

    def hook(module, args, output):
        raise Stop

    def sync():
        if device == "cuda":
            torch.cuda.synchronize()

    def full():
        with torch.inference_mode():
            model(ids, use_cache=False)
        sync()

    def stopped():
        handle = model.model.layers[capture].register_forward_hook(hook)
        try:
            with torch.inference_mode():
                model(ids, use_cache=False)
        except Stop:
            pass
        finally:
            handle.remove()
        sync()

    layers = cfg["num_hidden_layers"]
    attention = model.config._attn_implementation
    return [
        Row(f"transformers full forward ({attention})", timed(full, repeats), batch * seq,
            matmul_flops(cfg, batch, seq, layers, True)),
        Row(f"transformers capture {capture} + hook stop", timed(stopped, repeats), batch * seq,
            matmul_flops(cfg, batch, seq, capture + 1, False)),
    ]  # fmt: skip


def print_table(rows: list[Row], peak: float | None, title: str) -> None:
    """The device, the measured matmul rate and one markdown row per run (ms, tokens/s, MFU).

    peak None: a peer-only process, which leaves the accelerator to torch (no MFU; gpu.sh computes it
    from the emjax process's measured rate)."""
    if peak is None:
        print(f"{title}")
    else:
        print(f"device: {jax.devices()[0].device_kind} ({jax.default_backend()}), jax {jax.__version__}")
        print(f"{title}; measured matmul rate {peak / 1e12:.3f} TFLOP/s")
    print(f"| {'run':<46} | {'ms':>9} | {'tokens/s':>10} | {'MFU':>6} |")
    print(f"|{'-' * 48}|{'-' * 11}|{'-' * 12}|{'-' * 8}|")
    for row in rows:
        mfu = f"{row.flops / row.seconds / peak:>6.1%}" if peak else f"{'-':>6}"
        print(f"| {row.name:<46} | {row.seconds * 1e3:>9.1f} | {row.tokens_per_s:>10.0f} | {mfu} |")


def emit_rows(bench: str, preset: str, side: str, rows: list[Row]) -> None:
    for row in rows:
        emit(bench=bench, preset=preset, side=side, run=row.name, seconds=row.seconds, tokens=row.tokens,
             flops=row.flops)  # fmt: skip


def add_side_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--side", choices=("both", "emjax", "peer"), default="both",
        help="emjax, its peer, or both in this process; gpu.sh runs each side in its own process, so "
             "that JAX's preallocated device memory cannot starve torch",
    )  # fmt: skip


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", choices=sorted(PRESETS), default="cpu-gemma2")
    parser.add_argument("--repeats", type=int, default=3)
    add_side_argument(parser)
    args = parser.parse_args()
    p = PRESETS[args.preset]
    cfg, batch, seq, capture, dtype = p["config"], p["batch"], p["seq"], p["capture"], p["dtype"]
    title = f"preset {args.preset}: batch {batch} x {seq} tokens, {dtype}"
    rows, peak = [], None
    if args.side != "peer":
        peak = measured_matmul_rate(jnp.dtype(dtype))
        emit(bench="forward", preset=args.preset, side="emjax", run="matmul rate", flops_per_s=peak)
        ours = bench_emjax(cfg, batch, seq, capture, dtype, args.repeats)
        emit_rows("forward", args.preset, "emjax", ours)
        rows += ours
    missing = missing_module("torch", "transformers")
    if args.side != "emjax" and missing:
        skip_peer("forward", args.preset, missing)
    elif args.side != "emjax":
        theirs = bench_transformers(cfg, batch, seq, capture, dtype, args.repeats)
        emit_rows("forward", args.preset, "peer", theirs)
        rows += theirs
    print_table(rows, peak, title)
    if args.side == "both" and len(rows) == 4:
        for ours, theirs in zip(rows[:2], rows[2:]):
            print(f"speed-up ({ours.name.removeprefix('emjax ')}): {ours.tokens_per_s / theirs.tokens_per_s:.2f}x")


if __name__ == "__main__":
    main()
