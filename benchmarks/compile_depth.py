"""Does a training step's wall time (compile included) grow with depth? 4 vs 46 layers (Gemma-2-27B's).

    python benchmarks/compile_depth.py [--layers=4,46] [--steps=2]

A width-64 Gemma-2 (4 heads / 2 kv heads, head_dim 16, MLP 128, vocab 256,
window 32), random weights, LoRA rank 8 on every projection, trained for
`--steps` optimiser steps of 8 x 64 tokens through emjax.train.finetune (its
jitted step, remat "block"), each depth in a fresh process so nothing is
cached between them. The time is dominated by tracing and compiling the step:
with the layers scanned it should not grow with depth.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time

ARCH = dict(
    model_type="gemma2", vocab_size=256, hidden_size=64, intermediate_size=128, num_attention_heads=4,
    num_key_value_heads=2, head_dim=16, query_pre_attn_scalar=16, sliding_window=32,
)  # fmt: skip


def one(layers: int, steps: int) -> float:
    """Seconds for `steps` optimiser steps of a `layers`-layer model (model build excluded)."""
    import tempfile

    import numpy as np

    import emjax.models
    from emjax import lora, train
    from emjax.config import LoRAConfig, TrainConfig
    from emjax.data.chat import SFTRows

    model = emjax.models.build(ARCH | {"num_hidden_layers": layers}, dtype="float32")
    lora.attach(model, LoRAConfig(rank=8, alpha=16))
    rng = np.random.default_rng(0)
    n, length = 8 * steps, 64
    rows = SFTRows(rng.integers(0, 256, (n, length)).astype(np.int32), np.ones((n, length), np.int8),
                   np.ones((n, length), np.int32))  # fmt: skip
    cfg = TrainConfig(batch_size=8, max_steps=steps, checkpoint_every=0, eval_fraction=0.0, warmup_steps=0)
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as out:
        train.finetune(model, rows, None, cfg, out_dir=out, progress=False)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--layers", default="4,46")
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--child", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps({"layers": args.child, "seconds": one(args.child, args.steps)}))
        return
    results = []
    for layers in [int(x) for x in args.layers.split(",")]:
        command = [sys.executable, __file__, f"--child={layers}", f"--steps={args.steps}"]
        out = subprocess.run(command, capture_output=True, text=True, check=True).stdout
        results.append(json.loads(out.strip().splitlines()[-1]))
        print(json.dumps(results[-1]), flush=True)
    print(json.dumps({"ratio": round(results[-1]["seconds"] / results[0]["seconds"], 2)}))


if __name__ == "__main__":
    main()
