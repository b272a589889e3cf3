"""The features path: forward to a layer + SAE encode + feature statistics, emjax vs transformers + sae-lens.

    python benchmarks/features.py --preset=cpu      # Gemma-2 architecture d 512, 8 layers, capture 4, SAE 16k
    python benchmarks/features.py --preset=gpu      # Gemma-2-2B shapes, bf16, capture 12, SAEs 16k and 131k

Both sides do the same job on the same weights and tokens: run the model up
to the captured layer (transformers stops by raising from a forward hook),
encode every token with a JumpReLU SAE (sae-lens JumpReLUSAE.encode), and
accumulate, over the counted tokens (the second half of each row, as an
assistant reply), per-feature firing count, sum, sum of squares and max, the
reconstruction error, and per sample the mean-pooled code's top 64 and the
mean residual. emjax is `emjax.feature_stats.stream_features` end to end
(host transfers and chunk files included), timed after a warm-up run that
compiles it; torch runs eagerly under inference_mode. One run each.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import torch
from flax import nnx

import emjax.models
from emjax import distributed
from emjax.feature_stats import load_stats, stream_features
from emjax.sae import JumpReLUSAE

GEMMA2_SMALL = dict(
    model_type="gemma2", vocab_size=32000, hidden_size=512, intermediate_size=2048, num_hidden_layers=8,
    num_attention_heads=8, num_key_value_heads=4, head_dim=64, sliding_window=128, query_pre_attn_scalar=64,
)  # fmt: skip
GEMMA2_2B = dict(
    model_type="gemma2", vocab_size=256000, hidden_size=2304, intermediate_size=9216, num_hidden_layers=26,
    num_attention_heads=8, num_key_value_heads=4, head_dim=256, sliding_window=4096, query_pre_attn_scalar=256,
)  # fmt: skip
PRESETS = {
    "cpu": dict(config=GEMMA2_SMALL, layer=4, widths=[16384], rows=16, batch=4, seq=256, dtype="float32"),
    "gpu": dict(config=GEMMA2_2B, layer=12, widths=[16384, 131072], rows=256, batch=16, seq=1024, dtype="bfloat16"),
}
TOP = 64


def sae_weights(d: int, width: int, rng) -> dict[str, np.ndarray]:
    return {
        "W_enc": (rng.standard_normal((d, width)) / np.sqrt(d)).astype(np.float32),
        "W_dec": (rng.standard_normal((width, d)) / np.sqrt(d)).astype(np.float32),
        "b_enc": np.zeros(width, np.float32),
        "b_dec": np.zeros(d, np.float32),
        "threshold": np.zeros(width, np.float32),
    }


def calibrate_threshold(weights, x: np.ndarray, l0: int = 64) -> None:
    """One shared threshold giving about `l0` active features per token on a sample of activations."""
    h = x[:256].astype(np.float32) @ weights["W_enc"]
    weights["threshold"][:] = np.quantile(h, 1 - l0 / h.shape[1])


def torch_path(model, sae, ids, count, layer, batch, device, dtype):
    """The same statistics with transformers + sae-lens + torch reductions."""

    class Stop(Exception):
        pass

    seen = {}

    def hook(module, args, output):
        seen["x"] = output[0] if isinstance(output, tuple) else output
        raise Stop

    handle = model.model.layers[layer].register_forward_hook(hook)
    width = sae.cfg.d_sae
    fire = torch.zeros(width, dtype=torch.int64, device=device)
    total = torch.zeros(width, dtype=torch.float64, device=device)
    total_sq = torch.zeros(width, dtype=torch.float64, device=device)
    peak = torch.zeros(width, dtype=torch.float32, device=device)
    sse, values, indices, residuals = 0.0, [], [], []
    try:
        with torch.inference_mode():
            for b in range(0, len(ids), batch):
                tok = torch.as_tensor(ids[b : b + batch], device=device)
                w = torch.as_tensor(count[b : b + batch], device=device, dtype=torch.float32)
                try:
                    model(tok, use_cache=False)
                except Stop:
                    pass
                x = seen["x"].float()
                f = sae.encode(x.to(dtype)).float()
                cw = w[..., None]
                fire += ((f > 0) & (cw > 0)).sum((0, 1))
                total += (f * cw).sum((0, 1)).double()
                total_sq += (f * f * cw).sum((0, 1)).double()
                peak = torch.maximum(peak, torch.where(cw > 0, f, 0.0).amax((0, 1)))
                err = x - sae.decode(f.to(dtype)).float()
                sse += float((err * err * cw).sum())
                denom = w.sum(1).clamp(min=1)[:, None]
                top = torch.topk((f * cw).sum(1) / denom, TOP)
                values.append(top.values.cpu())
                indices.append(top.indices.cpu())
                residuals.append(((x * cw).sum(1) / denom).cpu())
        if device == "cuda":
            torch.cuda.synchronize()
    finally:
        handle.remove()
    return {"fire_count": fire.cpu().numpy(), "sum": total.cpu().numpy(), "max": peak.cpu().numpy(), "sse": sse}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", choices=sorted(PRESETS), default="cpu")
    args = parser.parse_args()
    p = PRESETS[args.preset]
    cfg, layer, rows, batch, seq, dtype = (p[k] for k in ("config", "layer", "rows", "batch", "seq", "dtype"))
    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch_dtype = getattr(torch, dtype)
    import sae_lens
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(0)
    hf = AutoModelForCausalLM.from_config(AutoConfig.for_model(**cfg)).to(dtype=torch_dtype).eval()
    tmp = Path(tempfile.mkdtemp(prefix="bench-features-"))
    hf.save_pretrained(tmp / "model")
    hf = hf.to(device)
    model = emjax.models.load(tmp / "model", dtype=dtype)
    forward = emjax.models.jit_forward(model, capture=(layer,), stop_at_layer=layer + 1)
    rng = np.random.default_rng(0)
    ids = rng.integers(0, cfg["vocab_size"], (rows, seq)).astype(np.int32)
    mask = np.ones_like(ids)
    count = np.zeros_like(ids)
    count[:, seq // 2 :] = 1  # the "assistant reply": the second half of each row
    mesh = distributed.make_mesh(devices=jax.devices()[:1])
    sample = np.asarray(forward(jnp.asarray(ids[:batch])).captured[layer], np.float32).reshape(-1, cfg["hidden_size"])

    print(
        f"jax {jax.__version__} on {jax.devices()[0].device_kind}; torch {torch.__version__} on {device} "
        f"({torch.get_num_threads()} threads); d_model {cfg['hidden_size']}, layer {layer}, {dtype}, "
        f"{rows} x {seq} tokens (half counted), batch {batch}"
    )
    table = []
    for width in p["widths"]:
        weights = sae_weights(cfg["hidden_size"], width, rng)
        calibrate_threshold(weights, sample)
        sae = JumpReLUSAE(cfg["hidden_size"], width, rngs=nnx.Rngs(0), dtype=dtype, apply_b_dec_to_input=False)
        for name, value in weights.items():
            getattr(sae, name).set_value(jnp.asarray(value, dtype))

        def run(out, n, sae=sae):
            return stream_features(
                forward, {layer: sae}, ids[:n], mask[:n], count[:n], out, mesh=mesh,
                batch_size=batch, rows_per_chunk=rows, top_codes=TOP, progress=False,
            )  # fmt: skip

        run(tmp / f"warm{width}", batch)  # compiles (same batch shapes)
        start = time.perf_counter()
        run(tmp / f"run{width}", rows)
        ours_s = time.perf_counter() - start
        ours = load_stats(tmp / f"run{width}", layer)

        oracle = sae_lens.JumpReLUSAE(
            sae_lens.JumpReLUSAEConfig(
                d_in=cfg["hidden_size"], d_sae=width, apply_b_dec_to_input=False, dtype=dtype, device=device
            )
        )
        oracle.load_state_dict({k: torch.from_numpy(v).to(device, torch_dtype) for k, v in weights.items()})
        torch_path(hf, oracle, ids[:batch], count[:batch], layer, batch, device, torch_dtype)  # warm-up
        start = time.perf_counter()
        ref = torch_path(hf, oracle, ids, count, layer, batch, device, torch_dtype)
        torch_s = time.perf_counter() - start

        agree = np.mean(ours.fire_count == ref["fire_count"])
        rel = np.abs(ours.sum - ref["sum"]).max() / np.abs(ref["sum"]).max()
        tokens = rows * seq
        l0 = ours.fire_count.sum() / ours.tokens
        print(f"width {width}: L0 {l0:.1f}; firing counts equal on {agree:.2%} of features; max rel sum diff {rel:.1e}")
        table += [("emjax stream_features", width, ours_s, tokens), ("transformers + sae-lens", width, torch_s, tokens)]

    print("\n| run | SAE width | s | tokens/s | vs torch |")
    print("|---|---:|---:|---:|---:|")
    reference = {w: s for name, w, s, _ in table if name.startswith("transformers")}
    for name, width, seconds, tokens in table:
        print(f"| {name} | {width} | {seconds:.2f} | {tokens / seconds:,.0f} | {reference[width] / seconds:.2f}x |")


if __name__ == "__main__":
    main()
