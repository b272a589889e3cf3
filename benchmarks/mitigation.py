"""Step-time overhead of the mitigation training options against the plain LoRA step, one run.

    python benchmarks/mitigation.py --preset=cpu-gemma2    # small Gemma-2 shapes, fp32, 4 x 256 tokens
    python benchmarks/mitigation.py --preset=gemma2-2b     # GPU: Gemma-2-2B shapes, bf16, 8 x 1024 tokens

Three runs of the real trainer (emjax.train.finetune, remat="block") on the same rows: plain;
ablation (100 random feature directions of an SAE, orthonormalised, projected out of the residual at
two layers in the training forward); penalty (the toxic-feature penalty of emjax.ablation on 100 of a
width-4096 TopK SAE's features at the same two layers, which adds a base forward to the deepest
layer without adapters). Best step after the first two, as benchmarks/train.py measures it.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import numpy as np
from flax import nnx

sys.path.insert(0, str(Path(__file__).parent))
from train import LORA, PRESETS, random_rows  # noqa: E402

import emjax.models  # noqa: E402
from emjax import ablation, lora, train  # noqa: E402
from emjax.config import TrainConfig  # noqa: E402
from emjax.sae.model import TopKSAE  # noqa: E402


def best_step(cfg, batch, seq, dtype, repeats, **options) -> float:
    model = lora.attach(emjax.models.build(cfg, seed=0, dtype=dtype), LORA)
    settings = TrainConfig(batch_size=batch, learning_rate=1e-5, warmup_steps=0, checkpoint_every=0, eval_fraction=0)
    rows = random_rows(cfg, batch, seq, repeats + 2)
    with tempfile.TemporaryDirectory() as out:
        history = train.finetune(model, rows, None, settings, out_dir=out, progress=False, **options)
    return batch * seq / max(r["tokens_per_s"] for r in history[2:])


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", choices=sorted(PRESETS), default="cpu-gemma2")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    p = PRESETS[args.preset]
    cfg, batch, seq, dtype = p["config"], p["batch"], p["seq"], p["dtype"]
    layers = (cfg["num_hidden_layers"] // 4, cfg["num_hidden_layers"] // 2)
    saes = {layer: TopKSAE(cfg["hidden_size"], 4096, rngs=nnx.Rngs(layer), k=32) for layer in layers}
    toxic = {layer: np.random.default_rng(layer).choice(4096, 100, replace=False) for layer in layers}
    runs = {
        "plain": {},
        "ablation (100 directions x 2 layers)": {"ablate": ablation.ablation_bases(saes, toxic)},
        "penalty (100 features x 2 layers)": {"extra_loss": ablation.penalty_loss(saes, toxic, 1.0)},
    }
    seconds = {name: best_step(cfg, batch, seq, dtype, args.repeats, **options) for name, options in runs.items()}
    print(f"preset {args.preset}: batch {batch} x {seq} tokens, {dtype}, remat=block, best step")
    print("| run | step ms | tokens/s | overhead |\n|---|---:|---:|---:|")
    for name, s in seconds.items():
        print(f"| {name} | {1000 * s:.1f} | {batch * seq / s:.0f} | {s / seconds['plain'] - 1:+.1%} |")


if __name__ == "__main__":
    main()
