"""LoRA fine-tuning throughput: emjax vs transformers + peft, same machine, one run.

    python benchmarks/train.py --preset=cpu-gemma2     # small Gemma-2 shapes, fp32, 4 x 256 tokens
    python benchmarks/train.py --preset=cpu-llama
    python benchmarks/train.py --preset=gemma2-2b      # GPU: Gemma-2-2B shapes, bf16, 8 x 1024 tokens
    python benchmarks/train.py --preset=gemma2-2b --side=emjax --remat=none   # as gpu.sh runs it

Both sides: random base weights of the same shapes and dtype, LoRA rank 32 /
alpha 64 (rsLoRA) on q/k/v/o/gate/up/down, AdamW, gradient clipping at 1.0,
every token a target, one optimiser step per batch. emjax runs its real
training loop (emjax.train.finetune: data sharding, the jitted step, the
per-step loss check and metrics) and reports the best step after the first
two, and its compile time as the first step's time less that best step;
transformers + peft runs forward(labels=...), backward, clip, step and
zero_grad, best of `--repeats` after one warm-up step. Each side is measured
with and without activation recomputation (emjax remat="block", transformers
gradient_checkpointing), or only as `--remat` says. MFU counts the training matmul FLOPs: 3x the forward
matmuls (forward, input gradients, and for LoRA only the tiny factor
gradients, not counted) against the measured dense-matmul rate.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from bench_rows import emit, missing_module, skip_peer  # noqa: E402
from forward import PRESETS as FORWARD_PRESETS  # noqa: E402
from forward import Row, add_side_argument, emit_rows, matmul_flops, measured_matmul_rate, print_table  # noqa: E402

import emjax.models  # noqa: E402
from emjax import lora, train  # noqa: E402
from emjax.config import LoRAConfig, TrainConfig  # noqa: E402
from emjax.data.chat import SFTRows  # noqa: E402

LORA = LoRAConfig(rank=32, alpha=64, rslora=True)
PRESETS = {
    "tiny": dict(config=FORWARD_PRESETS["tiny"]["config"], batch=2, seq=32, dtype="float32"),  # gpu.sh plumbing
    "cpu-gemma2": dict(config=FORWARD_PRESETS["cpu-gemma2"]["config"], batch=4, seq=256, dtype="float32"),
    "cpu-llama": dict(config=FORWARD_PRESETS["cpu-llama"]["config"], batch=4, seq=256, dtype="float32"),
    "gemma2-2b": dict(config=FORWARD_PRESETS["gemma2-2b"]["config"], batch=8, seq=1024, dtype="bfloat16"),
}


def training_flops(cfg: dict, batch: int, seq: int) -> float:
    # Forward plus the input-gradient pass (the frozen weights need no weight gradient).
    return 2 * matmul_flops(cfg, batch, seq, cfg["num_hidden_layers"], head=True)


def random_rows(cfg: dict, batch: int, seq: int, steps: int) -> SFTRows:
    tokens = np.random.RandomState(0).randint(0, cfg["vocab_size"], (batch * steps, seq)).astype(np.int32)
    return SFTRows(tokens, np.ones_like(tokens, np.int8), np.ones_like(tokens))


def bench_emjax(cfg, batch, seq, dtype, repeats, remat) -> tuple[Row, float]:
    """(best step after the first two, compile time: the first step's time less that best step)."""
    model = lora.attach(emjax.models.build(cfg, seed=0, dtype=dtype), LORA)
    steps = repeats + 2
    settings = TrainConfig(
        batch_size=batch, learning_rate=1e-5, warmup_steps=0, remat=remat, checkpoint_every=0, eval_fraction=0
    )
    rows = random_rows(cfg, batch, seq, steps)
    with tempfile.TemporaryDirectory() as out:
        history = train.finetune(model, rows, None, settings, out_dir=out, progress=False)
    seconds = [batch * seq / r["tokens_per_s"] for r in history if "tokens_per_s" in r]
    best = min(seconds[2:])
    row = Row(f"emjax (remat={remat})", best, batch * seq, training_flops(cfg, batch, seq))
    return row, seconds[0] - best


def bench_peft(cfg, batch, seq, dtype, repeats, checkpointing) -> Row:
    import peft
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    device = "cuda" if torch.cuda.is_available() else "cpu"
    config = AutoConfig.for_model(**cfg)
    with torch.device(device):  # random weights made on the device, not on the CPU
        base = AutoModelForCausalLM.from_config(config).to(dtype=getattr(torch, dtype))
    if checkpointing:
        base.gradient_checkpointing_enable()
        base.enable_input_require_grads()
    peft_config = peft.LoraConfig(
        r=LORA.rank, lora_alpha=LORA.alpha, use_rslora=LORA.rslora, lora_dropout=0.0, target_modules=list(LORA.targets)
    )
    model = peft.get_peft_model(base, peft_config).train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5, weight_decay=0.01)
    ids = torch.randint(0, cfg["vocab_size"], (batch, seq), device=device)

    def step():
        loss = model(input_ids=ids, labels=ids, use_cache=False).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        loss.item()  # as a training loop that logs its loss

    step()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        step()
        best = min(best, time.perf_counter() - start)
    attention = model.base_model.model.config._attn_implementation
    name = f"transformers + peft ({attention}{', grad ckpt' if checkpointing else ''})"
    return Row(name, best, batch * seq, training_flops(cfg, batch, seq))


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", choices=sorted(PRESETS), default="cpu-gemma2")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--remat", choices=("both", "none", "block"), default="both",
                        help="emjax remat policy; the peer runs without (none) or with (block) gradient checkpointing")
    add_side_argument(parser)
    args = parser.parse_args()
    p = PRESETS[args.preset]
    cfg, batch, seq, dtype = p["config"], p["batch"], p["seq"], p["dtype"]
    remats = ("none", "block") if args.remat == "both" else (args.remat,)
    title = f"preset {args.preset}: batch {batch} x {seq} tokens, {dtype}, one optimiser step per row"
    ours, theirs, peak = [], [], None
    if args.side != "peer":
        peak = measured_matmul_rate(jnp.dtype(dtype))
        emit(bench="train", preset=args.preset, side="emjax", run="matmul rate", flops_per_s=peak)
        for remat in remats:
            row, compile_s = bench_emjax(cfg, batch, seq, dtype, args.repeats, remat)
            emit_rows("train", args.preset, "emjax", [row])
            emit(bench="train", preset=args.preset, side="emjax", run=f"{row.name} compile", seconds=compile_s)
            print(f"{row.name}: compile {compile_s:.1f} s (first step less the best step)")
            ours.append(row)
    missing = missing_module("torch", "transformers", "peft")
    if args.side != "emjax" and missing:
        skip_peer("train", args.preset, missing)
    elif args.side != "emjax":
        for remat in remats:
            row = bench_peft(cfg, batch, seq, dtype, args.repeats, checkpointing=remat == "block")
            emit_rows("train", args.preset, "peer", [row])
            theirs.append(row)
    print_table(ours + theirs, peak, title)
    if ours and theirs:
        best_ours = min(r.seconds for r in ours)
        best_theirs = min(r.seconds for r in theirs)
        print(f"best emjax / best transformers + peft: {best_theirs / best_ours:.2f}x tokens/s")


if __name__ == "__main__":
    main()
