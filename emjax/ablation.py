"""Keeping fine-tuning away from toxic features: concept ablation and a toxic-feature penalty.

Two mitigation arms that keep every training sample (issue 17):

- ablation (Casademunt et al. 2025, arXiv 2507.16795): during training only,
  project the span of chosen directions (the toxic features' SAE decoder rows)
  out of the residual stream at the SAE layers, so the update cannot use them:

      Q = orthonormal_basis(feature_directions(sae, toxic))      # once, by QR
      model(tokens, ..., ablate={layer: Q})                       # in the loss

  The control arm ablates as many random features: random_features(...).

- penalty: add lam * toxic_penalty(z_ft, z_base) to the loss, the mean squared
  increase of the toxic features' SAE pre-activations over the base model's on
  the same batch (the base computed in the same step with the adapters off):

      extra_loss = penalty_loss({layer: sae}, {layer: toxic}, lam=1.0)
      value, metrics = extra_loss(model, batch)   # inside the training step

Only pre-activations enter the penalty: they are linear in the residual, so the
penalty sees a toxic feature moving towards its threshold before it fires.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import scipy.linalg
from flax import nnx

from emjax import distributed, lora
from emjax.sae.model import SAE

_log = logging.getLogger(__name__)
F32 = jnp.float32


# ---------------------------------------------------------------------------- directions


def orthonormal_basis(directions, *, tol: float = 1e-4) -> np.ndarray:
    """Q [r, d_model] (float32) with orthonormal rows spanning `directions` [k, d_model], r <= k.

    Rows are scaled to unit norm, then a column-pivoted QR (float64) orders them
    by how much new span each adds; a direction whose residual |R_jj| is below
    `tol` (relative to the first) lies, to that tolerance, in the span of the
    others and is dropped (logged with the count). Zero rows are dropped too.
    """
    d = np.asarray(directions, dtype=np.float64)
    if d.ndim != 2 or d.shape[0] == 0:
        raise ValueError(f"directions must be a non-empty [k, d_model] array, got shape {d.shape}")
    if not np.isfinite(d).all():
        raise ValueError("directions contain non-finite values")
    norms = np.linalg.norm(d, axis=1)
    nonzero = norms > 0
    if not nonzero.any():
        raise ValueError(f"all {d.shape[0]} directions are zero")
    unit = d[nonzero] / norms[nonzero, None]
    q, r, _ = scipy.linalg.qr(unit.T, mode="economic", pivoting=True)
    diagonal = np.abs(np.diag(r))
    rank = int(np.sum(diagonal > tol * diagonal[0]))
    dropped = d.shape[0] - rank
    if dropped:
        _log.warning(
            "orthonormal_basis: %d of %d directions dropped (zero or within tol=%g of the others' span)",
            dropped, d.shape[0], tol,
        )  # fmt: skip
    return np.ascontiguousarray(q[:, :rank].T, dtype=np.float32)


def feature_directions(sae: SAE, features: Sequence[int]) -> np.ndarray:
    """The decoder rows W_dec[features] [k, d_model] (float32, on the host)."""
    index = _feature_index(features, sae.d_sae, "features")
    return distributed.gather_to_host(jnp.take(sae.W_dec[...], jnp.asarray(index), axis=0)).astype(np.float32)


def random_features(d_sae: int, count: int, *, seed: int, exclude: Sequence[int] = ()) -> np.ndarray:
    """`count` distinct feature indices drawn uniformly from 0..d_sae-1 outside `exclude` (sorted; seeded)."""
    pool = np.setdiff1d(np.arange(d_sae), np.asarray(exclude, dtype=np.int64))
    if not 0 <= count <= len(pool):
        raise ValueError(
            f"cannot draw {count} random features from {len(pool)} (d_sae={d_sae}, {len(exclude)} excluded)"
        )
    return np.sort(np.random.default_rng(seed).choice(pool, size=count, replace=False))


def ablation_bases(
    saes: Mapping[int, SAE], features: Mapping[int, Sequence[int]], *, tol: float = 1e-4
) -> dict[int, jax.Array]:
    """{layer: Q} for `model(..., ablate=...)`: the orthonormalised decoder rows of `features[layer]`."""
    _same_layers(saes, features)
    return {int(layer): jnp.asarray(orthonormal_basis(feature_directions(saes[layer], features[layer]), tol=tol))
            for layer in sorted(saes)}  # fmt: skip


# ---------------------------------------------------------------------------- SAE pre-activations


def restrict(sae: SAE, features: Sequence[int]) -> SAE:
    """A copy of `sae` holding only `features` (every parameter with an "sae" axis sliced to them).

    Its `pre_activations(x)` equals `sae.pre_activations(x)[..., features]` while
    multiplying by a [d_model, k] encoder instead of the whole one, so a penalty
    over a few toxic features of a 1M-feature SAE stays cheap. Use it for
    pre-activations only (a TopK SAE's k no longer means anything after slicing).
    """
    index = jnp.asarray(_feature_index(features, sae.d_sae, "features"))
    copy = nnx.clone(sae)
    for _, var in nnx.to_flat_state(nnx.state(copy, nnx.Param)):
        axes = var.get_metadata().get("logical_axes") or ()
        if "sae" in axes:
            sliced = jnp.take(var.get_value(), index, axis=list(axes).index("sae"))
            var.set_value(jnp.asarray(distributed.gather_to_host(sliced)))
    return copy


def pre_activations(saes: Mapping[int, SAE], captured: Mapping[int, jax.Array]) -> dict[int, jax.Array]:
    """{layer: saes[layer].pre_activations(captured[layer])} [..., d_sae] fp32, for a forward's `captured`."""
    missing = sorted(set(saes) - set(captured))
    if missing:
        raise ValueError(f"no captured residual at SAE layers {missing} (captured: {sorted(captured)})")
    return {layer: sae.pre_activations(captured[layer]) for layer, sae in saes.items()}


# ---------------------------------------------------------------------------- the penalty


def toxic_penalty(
    z_ft: jax.Array,
    z_base: jax.Array,
    toxic_idx: Sequence[int] | jax.Array | None = None,
    *,
    mask: jax.Array | None = None,
) -> jax.Array:
    """Mean squared increase of the toxic features' pre-activations over the base model's.

        penalty = sum_t m_t * mean_j relu(z_ft[t, j] - z_base[t, j])^2 / sum_t m_t

    over tokens t (every leading position of z [..., F], weighted by `mask`
    [...], default all ones) and toxic features j (the columns `toxic_idx`,
    default all F columns). Decreases are free: only a push towards a toxic
    feature costs. z_base is a constant (stop_gradient). A mask with no
    tokens gives 0.
    """
    if z_ft.shape != z_base.shape:
        raise ValueError(f"z_ft {z_ft.shape} and z_base {z_base.shape} differ in shape")
    if toxic_idx is not None:
        toxic_idx = jnp.asarray(toxic_idx)
        z_ft, z_base = jnp.take(z_ft, toxic_idx, axis=-1), jnp.take(z_base, toxic_idx, axis=-1)
    dtype = jnp.promote_types(z_ft.dtype, F32)  # fp32 at least (fp64 stays fp64)
    increase = jax.nn.relu(z_ft.astype(dtype) - jax.lax.stop_gradient(z_base).astype(dtype))
    per_token = jnp.mean(jnp.square(increase), axis=-1)
    if mask is None:
        return jnp.mean(per_token)
    if mask.shape != per_token.shape:
        raise ValueError(f"mask {mask.shape} does not match the token dimensions {per_token.shape}")
    weights = mask.astype(dtype)
    return jnp.sum(per_token * weights) / jnp.maximum(jnp.sum(weights), 1.0)


def without_adapters(model):
    """The same model with every LoRA factor set to zero: the base model's forward, exactly (x A 0 = 0).

    Works inside a trace (a functional copy; `model` is not modified).
    """
    graphdef, factors, rest = nnx.split(model, lora.LoRAParam, ...)
    return nnx.merge(graphdef, jax.tree.map(jnp.zeros_like, factors), rest)


TOKENS = ("all", "assistant")


def penalty_loss(
    saes: Mapping[int, SAE],
    toxic_idx: Mapping[int, Sequence[int]],
    lam: float,
    *,
    tokens: str = "all",
    remat=None,
) -> Callable[[nnx.Module, Mapping[str, jax.Array]], tuple[jax.Array, dict[str, jax.Array]]]:
    """extra_loss(model, batch) -> (lam * penalty, metrics) for the training loop.

    `saes[layer]` reads the residual after block `layer`; `toxic_idx[layer]`
    are its toxic features. Each call runs the model (adapters as they are) and
    the base (adapters zeroed, no gradient) up to the last SAE layer, reads the
    toxic pre-activations and returns lam times the mean over layers of
    toxic_penalty. batch: "tokens" [B, T], and "segments" [B, T] (packed rows,
    0 = padding) or "attention_mask" [B, T]; `tokens="assistant"` counts only
    tokens with batch["loss_mask"] > 0, "all" every real token. metrics:
    {"toxic_penalty": mean penalty, "toxic_penalty/<layer>": per layer}.
    lam = 0 returns exactly 0 without running anything, so the plain trainer's
    loss and gradients are untouched.
    """
    _same_layers(saes, toxic_idx)
    if tokens not in TOKENS:
        raise ValueError(f"penalty tokens={tokens!r}; choose one of {TOKENS}")
    if lam < 0:
        raise ValueError(f"penalty lambda must be >= 0, got {lam}")
    restricted = {int(layer): restrict(sae, toxic_idx[layer]) for layer, sae in saes.items()}
    layers = sorted(restricted)
    lam = float(lam)

    def extra_loss(model, batch):
        if lam == 0.0:
            return jnp.zeros((), F32), {}
        inputs = dict(capture=layers, stop_at_layer=layers[-1] + 1, remat=remat)
        if "segments" in batch:
            inputs["segment_ids"] = batch["segments"]
            real = batch["segments"] > 0
        elif "attention_mask" in batch:
            inputs["attention_mask"] = batch["attention_mask"]
            real = batch["attention_mask"] > 0
        else:
            real = jnp.ones(batch["tokens"].shape, bool)
        mask = real & (batch["loss_mask"] > 0) if tokens == "assistant" else real
        tuned = pre_activations(restricted, model(batch["tokens"], **inputs).captured)
        base = pre_activations(restricted, without_adapters(model)(batch["tokens"], **inputs).captured)
        per_layer = {layer: toxic_penalty(tuned[layer], base[layer], mask=mask) for layer in layers}
        penalty = sum(per_layer.values()) / len(layers)
        metrics = {"toxic_penalty": penalty} | {f"toxic_penalty/{layer}": p for layer, p in per_layer.items()}
        return lam * penalty, metrics

    return extra_loss


# ---------------------------------------------------------------------------- checks


def _feature_index(features, d_sae: int, what: str) -> np.ndarray:
    index = np.asarray(features, dtype=np.int64).reshape(-1)
    if index.size == 0:
        raise ValueError(f"{what}: no feature indices given")
    bad = index[(index < 0) | (index >= d_sae)]
    if bad.size:
        raise ValueError(f"{what}: indices {bad[:5].tolist()} are outside 0..{d_sae - 1}")
    return index


def _same_layers(saes: Mapping[int, SAE], features: Mapping[int, Sequence[int]]) -> None:
    if not saes:
        raise ValueError("no SAE layers given")
    if set(saes) != set(features):
        raise ValueError(f"SAE layers {sorted(saes)} and feature layers {sorted(features)} differ")


def arm_training(arm: str, saes: Mapping[int, SAE], toxic: Mapping[int, np.ndarray], *, penalty: float,
                 seed: int) -> tuple[dict, dict]:  # fmt: skip
    """(emjax.train.finetune keyword arguments, their record) of a training arm at every SAE layer: the toxic
    features' decoder directions ablated ("ablation"), as many random features' directions ablated ("randdir",
    drawn by `seed`), or the penalty of weight `penalty` on toxic-feature increases ("penalty")."""
    if arm == "penalty":
        record = {"penalty": penalty, "toxic_features": {str(k): v.tolist() for k, v in toxic.items()}}
        return {"extra_loss": penalty_loss(saes, toxic, penalty, tokens="assistant")}, record
    if arm not in ("ablation", "randdir"):
        raise ValueError(f"unknown training arm {arm!r} (ablation, randdir or penalty)")
    chosen = toxic
    if arm == "randdir":
        chosen = {layer: random_features(saes[layer].d_sae, len(ids), seed=seed, exclude=ids)
                  for layer, ids in toxic.items()}  # fmt: skip
    bases = ablation_bases(saes, chosen)
    record = {
        "ablated_features": {str(k): np.asarray(v).tolist() for k, v in chosen.items()},
        "basis_rank": {str(k): int(q.shape[0]) for k, q in bases.items()},
    }
    return {"ablate": bases}, record
