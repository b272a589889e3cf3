"""Sparse autoencoder architectures as Flax NNX modules over one shared interface.

Canonical layout for every architecture and every release: W_enc [d_in, d_sae],
W_dec [d_sae, d_in] (rows are the feature directions, not assumed unit norm),
b_enc [d_sae], b_dec [d_in], and for JumpReLU a threshold [d_sae]. Loaders
convert other layouts to this one.

    h = (x * input_scale - b_dec?) @ W_enc + b_enc      pre-activations
    f = activation(h)                                   feature activations
    x_hat = (f @ W_dec + b_dec) / input_scale           reconstruction

`input_scale` is a dataset-level activation norm scaling (1 for every public
release once loaded: the loaders fold it into the weights, as `fold_input_scale`
does before saving).
"""

from __future__ import annotations

from typing import ClassVar

import jax
import jax.numpy as jnp
from flax import nnx

from emjax.models.layers import F32, param

# The feature dimension ("sae") shards over the tensor axis; d_in ("embed") follows the model rules.
ENCODER_AXES = ("embed", "sae")
DECODER_AXES = ("sae", "embed")


def _unit_rows(key, shape, dtype):
    w = jax.random.normal(key, shape, dtype)
    return w / jnp.linalg.norm(w, axis=-1, keepdims=True)


class SAE(nnx.Module):
    """Shared parameters and maths; subclasses define `activate(h)`."""

    architecture: ClassVar[str]

    def __init__(
        self,
        d_in: int,
        d_sae: int,
        *,
        rngs: nnx.Rngs,
        dtype=F32,
        apply_b_dec_to_input: bool = True,
        input_scale: float = 1.0,
    ):
        self.apply_b_dec_to_input = apply_b_dec_to_input
        self.input_scale = float(input_scale)
        self.W_dec = param(rngs, (d_sae, d_in), DECODER_AXES, dtype, _unit_rows)
        self.W_enc = nnx.Param(self.W_dec.get_value().T, logical_axes=ENCODER_AXES)
        self.b_enc = nnx.Param(jnp.zeros((d_sae,), dtype), logical_axes=("sae",))
        self.b_dec = nnx.Param(jnp.zeros((d_in,), dtype), logical_axes=("embed",))

    @property
    def d_in(self) -> int:
        return self.W_enc.shape[0]

    @property
    def d_sae(self) -> int:
        return self.W_enc.shape[1]

    @property
    def dtype(self):
        return self.W_enc.dtype

    def pre_activations(self, x: jax.Array) -> jax.Array:
        """h = (x * input_scale - b_dec if applied) @ W_enc + b_enc, accumulated in fp32."""
        if x.shape[-1] != self.d_in:
            raise ValueError(f"SAE input has d_model {x.shape[-1]}, but this SAE reads d_in={self.d_in}")
        x = x.astype(self.dtype)
        if self.input_scale != 1.0:
            x = x * jnp.asarray(self.input_scale, self.dtype)
        if self.apply_b_dec_to_input:
            x = x - self.b_dec[...]
        h = jnp.matmul(x, self.W_enc[...], preferred_element_type=F32)
        return h + self.b_enc[...].astype(F32)

    def activate(self, h: jax.Array) -> jax.Array:
        raise NotImplementedError

    def encode_with_pre(self, x: jax.Array) -> tuple[jax.Array, jax.Array]:
        """(feature activations, pre-activations), both [..., d_sae] in fp32."""
        h = self.pre_activations(x)
        return self.activate(h), h

    def encode(self, x: jax.Array) -> jax.Array:
        return self.encode_with_pre(x)[0]

    def decode(self, f: jax.Array) -> jax.Array:
        out = jnp.matmul(f.astype(self.dtype), self.W_dec[...], preferred_element_type=F32)
        out = out + self.b_dec[...].astype(F32)
        return out / self.input_scale if self.input_scale != 1.0 else out

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.decode(self.encode(x))

    def fold_input_scale(self) -> None:
        """Fold `input_scale` s into the weights so the SAE reads raw activations:
        W_enc * s and W_dec / s, b_dec / s; pre-activations are unchanged."""
        s = self.input_scale
        if s == 1.0:
            return
        self.W_enc.set_value(self.W_enc[...] * s)
        self.W_dec.set_value(self.W_dec[...] / s)
        self.b_dec.set_value(self.b_dec[...] / s)
        self.input_scale = 1.0


class ReLUSAE(SAE):
    architecture = "standard"

    def activate(self, h):
        return jax.nn.relu(h)


class JumpReLUSAE(SAE):
    """f = relu(h) * (h > threshold), strictly greater, as in Gemma Scope."""

    architecture = "jumprelu"

    def __init__(self, d_in, d_sae, *, rngs, dtype=F32, threshold: float = 0.0, **kwargs):
        super().__init__(d_in, d_sae, rngs=rngs, dtype=dtype, **kwargs)
        self.threshold = nnx.Param(jnp.full((d_sae,), threshold, dtype), logical_axes=("sae",))

    def activate(self, h):
        return jnp.where(h > self.threshold[...].astype(F32), jax.nn.relu(h), 0.0)


class TopKSAE(SAE):
    """The k largest pre-activations of each row, through a ReLU; the rest zero."""

    architecture = "topk"

    def __init__(self, d_in, d_sae, *, rngs, k: int, dtype=F32, **kwargs):
        super().__init__(d_in, d_sae, rngs=rngs, dtype=dtype, **kwargs)
        if not 0 < k <= d_sae:
            raise ValueError(f"TopK SAE: k={k} must be in [1, d_sae={d_sae}]")
        self.k = int(k)

    def activate(self, h):
        return top_k_dense(h, self.k)


class BatchTopKSAE(JumpReLUSAE):
    """Trained with a top-(k * rows) selection over the whole batch; used (and
    saved) as a JumpReLU SAE whose threshold is one value shared by all features."""

    architecture = "jumprelu"

    def __init__(self, d_in, d_sae, *, rngs, k: int, dtype=F32, **kwargs):
        super().__init__(d_in, d_sae, rngs=rngs, dtype=dtype, **kwargs)
        self.k = int(k)

    def encode_batch_topk(self, x: jax.Array) -> tuple[jax.Array, jax.Array]:
        """(activations, pre-activations) with the batch-level top-k of relu(h) over rows [B, d_sae]."""
        h = self.pre_activations(x)
        acts = jax.nn.relu(h)
        flat = acts.reshape(-1)
        values, index = jax.lax.top_k(flat, self.k * (flat.size // self.d_sae))
        return jnp.zeros_like(flat).at[index].set(values).reshape(acts.shape), h


def top_k_dense(h: jax.Array, k: int) -> jax.Array:
    """relu of the k largest entries of each row of h, in place; zeros elsewhere."""
    values, index = jax.lax.top_k(h, k)
    rows = jnp.zeros_like(h)
    return jnp.put_along_axis(rows, index, jax.nn.relu(values), axis=-1, inplace=False)


# SAELens architecture names -> modules (BatchTopK SAEs are saved and loaded as JumpReLU).
ARCHITECTURES: dict[str, type[SAE]] = {"standard": ReLUSAE, "jumprelu": JumpReLUSAE, "topk": TopKSAE}
