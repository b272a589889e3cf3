"""SAE encode throughput and training tokens/s: emjax vs sae-lens, same machine, one run.

    python benchmarks/sae.py --preset=cpu   # fp32, d_model 2304, widths 16k and 65k
    python benchmarks/sae.py --preset=gpu   # bf16, d_model 2304, widths 16k-131k, and a 1M-width encode

Encode rows: a Gemma-Scope-style JumpReLU SAE encoding a batch of activations
(emjax jit, sae-lens JumpReLUSAE.encode under no_grad), and the bare x @ W_enc
matmul in jax as the floor. Train rows: one TopK step (k=64, AuxK on) with Adam,
emjax.sae.train vs sae-lens TopKTrainingSAE.training_forward_pass + backward +
Adam; emjax's per-step time is the difference between a (1 + n)-step and a
1-step run, so compilation and set-up cancel. Times are the best of several runs.
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np
import torch
from flax import nnx

import emjax.sae
from emjax.sae import JumpReLUSAE, SAETrainConfig, TopKSAE

PRESETS = {
    "cpu": dict(
        d=2304,
        widths=[16384, 65536],
        encode_rows=1024,
        train_rows=512,
        train_steps=2,
        dtype="float32",
        repeats=3,
        encode_only_widths=[],
    ),
    "gpu": dict(
        d=2304,
        widths=[16384, 65536, 131072],
        encode_rows=8192,
        train_rows=4096,
        train_steps=20,
        dtype="bfloat16",
        repeats=5,
        encode_only_widths=[1 << 20],
    ),
}


def best_time(fn, repeats: int) -> float:
    fn()  # warm-up: compilation, allocation
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def jumprelu_weights(d: int, width: int, rng) -> dict[str, np.ndarray]:
    return {
        "W_enc": rng.standard_normal((d, width), np.float32) / np.sqrt(d),
        "W_dec": rng.standard_normal((width, d), np.float32) / np.sqrt(d),
        "b_enc": np.zeros(width, np.float32),
        "b_dec": np.zeros(d, np.float32),
        "threshold": np.full(width, 0.1, np.float32),
    }


def encode_rows(d, width, rows, dtype, repeats, rng, *, with_sae_lens: bool) -> list[tuple]:
    weights = jumprelu_weights(d, width, rng)
    x_np = rng.standard_normal((rows, d), np.float32)
    sae = JumpReLUSAE(d, width, rngs=nnx.Rngs(0), dtype=dtype, apply_b_dec_to_input=False)
    for name, value in weights.items():
        getattr(sae, name).set_value(jnp.asarray(value, dtype))
    x = jnp.asarray(x_np, dtype)
    graphdef, state = nnx.split(sae)
    encode = jax.jit(lambda state, x: nnx.merge(graphdef, state).encode(x))
    matmul = jax.jit(lambda w, x: jnp.matmul(x, w, preferred_element_type=jnp.float32))
    out = [
        ("encode", "emjax", width, rows, best_time(lambda: encode(state, x).block_until_ready(), repeats)),
        (
            "encode",
            "x @ W_enc (jax)",
            width,
            rows,
            best_time(lambda: matmul(sae.W_enc[...], x).block_until_ready(), repeats),
        ),
    ]
    if with_sae_lens:
        import sae_lens

        device = "cuda" if torch.cuda.is_available() else "cpu"
        torch_dtype = getattr(torch, dtype)
        oracle = sae_lens.JumpReLUSAE(
            sae_lens.JumpReLUSAEConfig(d_in=d, d_sae=width, apply_b_dec_to_input=False, dtype=dtype, device=device)
        )
        oracle.load_state_dict({k: torch.from_numpy(v).to(device, torch_dtype) for k, v in weights.items()})
        tx = torch.from_numpy(x_np).to(device, torch_dtype)

        def run():
            with torch.no_grad():
                oracle.encode(tx)
            if device == "cuda":
                torch.cuda.synchronize()

        out.append(("encode", "sae-lens", width, rows, best_time(run, repeats)))
    return out


def activations(d, rows, seed):
    rng = np.random.default_rng(seed)
    while True:
        yield rng.standard_normal((rows, d), np.float32)


def train_rows(d, width, rows, steps, dtype, repeats) -> list[tuple]:
    def emjax_run(n):
        sae = TopKSAE(d, width, rngs=nnx.Rngs(0), k=64, dtype=dtype)
        config = SAETrainConfig(steps=n, warmup_steps=1, dead_after_tokens=rows, progress=False, b_dec_init="mean")
        start = time.perf_counter()
        trained, _ = emjax.sae.train(sae, activations(d, rows, 0), config)
        jax.block_until_ready(trained.W_dec[...])
        return time.perf_counter() - start

    per_step = min(emjax_run(1 + steps) - emjax_run(1) for _ in range(max(1, repeats // 2))) / steps
    out = [("train step", "emjax", width, rows, per_step)]

    import sae_lens
    from sae_lens.saes.sae import TrainStepInput

    device = "cuda" if torch.cuda.is_available() else "cpu"
    oracle = sae_lens.TopKTrainingSAE(
        sae_lens.TopKTrainingSAEConfig(d_in=d, d_sae=width, k=64, dtype=dtype, device=device)
    )
    optimizer = torch.optim.Adam(oracle.parameters(), lr=2e-4)
    batches = activations(d, rows, 0)
    dead = torch.ones(width, dtype=torch.bool, device=device)

    def step():
        x = torch.from_numpy(next(batches)).to(device, getattr(torch, dtype))
        output = oracle.training_forward_pass(
            TrainStepInput(sae_in=x, coefficients={}, dead_neuron_mask=dead, n_training_steps=0, is_logging_step=False)
        )
        output.loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        if device == "cuda":
            torch.cuda.synchronize()

    out.append(("train step", "sae-lens", width, rows, best_time(step, repeats)))
    return out


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--preset", choices=sorted(PRESETS), default="cpu")
    args = parser.parse_args()
    p = PRESETS[args.preset]
    dtype = p["dtype"]
    rng = np.random.default_rng(0)
    print(
        f"jax {jax.__version__} on {jax.devices()[0].device_kind}; torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads; d_model {p['d']}, {dtype}"
    )
    rows = []
    for width in p["widths"] + p["encode_only_widths"]:
        rows += encode_rows(p["d"], width, p["encode_rows"], dtype, p["repeats"], rng, with_sae_lens=True)
        print(*rows[-3:], sep="\n", flush=True)
        if width in p["widths"]:
            rows += train_rows(p["d"], width, p["train_rows"], p["train_steps"], dtype, p["repeats"])
            print(*rows[-2:], sep="\n", flush=True)

    print("\n| what | implementation | width | rows | ms | tokens/s | vs sae-lens |")
    print("|---|---|---|---|---|---|---|")
    reference = {(what, width): t for what, impl, width, _, t in rows if impl == "sae-lens"}
    for what, impl, width, n, seconds in rows:
        ratio = reference.get((what, width), float("nan")) / seconds
        print(f"| {what} | {impl} | {width} | {n} | {seconds * 1e3:.1f} | {n / seconds:,.0f} | {ratio:.2f}x |")


if __name__ == "__main__":
    main()
