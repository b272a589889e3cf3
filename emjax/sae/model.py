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

Each architecture also owns how it trains and exports (emjax.sae.train and
emjax.sae.io never ask what type an SAE is): `training_activations`,
`extra_losses` (named, each logged under its name), `constrain_gradients`,
`post_update`, `prepare_training`, `training_stats` and `saelens_fields`. A new
architecture is one new class. `config` below is an emjax.sae.SAETrainConfig.
"""

from __future__ import annotations

import functools
from typing import ClassVar

import jax
import jax.numpy as jnp
from flax import nnx

from emjax.models.layers import F32, param
from emjax.precision import matmul_precision

# The feature dimension ("sae") shards over the tensor axis; d_in ("embed") follows the model rules.
ENCODER_AXES = ("embed", "sae")
DECODER_AXES = ("sae", "embed")


# ---------------------------------------------------------------------------- straight-through estimators


def _rectangle(u):
    return (jnp.abs(u) < 0.5).astype(u.dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def jumprelu(h, threshold, bandwidth):
    """h * H(h - threshold); d/dthreshold = -(threshold / bandwidth) K((h - threshold) / bandwidth)."""
    return h * (h > threshold)


def _jumprelu_fwd(h, threshold, bandwidth):
    return jumprelu(h, threshold, bandwidth), (h, threshold)


def _jumprelu_bwd(bandwidth, res, g):
    h, threshold = res
    d_threshold = -(threshold / bandwidth) * _rectangle((h - threshold) / bandwidth) * g
    return (h > threshold) * g, d_threshold.reshape(-1, threshold.shape[-1]).sum(0)


jumprelu.defvjp(_jumprelu_fwd, _jumprelu_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def heaviside(h, threshold, bandwidth):
    """H(h - threshold); d/dh = 0, d/dthreshold = -(1 / bandwidth) K((h - threshold) / bandwidth)."""
    return (h > threshold).astype(h.dtype)


def _heaviside_fwd(h, threshold, bandwidth):
    return heaviside(h, threshold, bandwidth), (h, threshold)


def _heaviside_bwd(bandwidth, res, g):
    h, threshold = res
    d_threshold = -(1.0 / bandwidth) * _rectangle((h - threshold) / bandwidth) * g
    return jnp.zeros_like(h), d_threshold.reshape(-1, threshold.shape[-1]).sum(0)


heaviside.defvjp(_heaviside_fwd, _heaviside_bwd)


def _unit_rows(key, shape, dtype):
    w = jax.random.normal(key, shape, dtype)
    return w / jnp.linalg.norm(w, axis=-1, keepdims=True)


class SAE(nnx.Module):
    """Shared parameters and maths; subclasses define `activate(h)`."""

    architecture: ClassVar[str]  # the SAELens name it is saved under (cfg.json "architecture")

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
        h = jnp.matmul(x, self.W_enc[...], preferred_element_type=F32, precision=matmul_precision(self.dtype))
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
        precision = matmul_precision(self.dtype)
        out = jnp.matmul(f.astype(self.dtype), self.W_dec[...], preferred_element_type=F32, precision=precision)
        out = out + self.b_dec[...].astype(F32)
        return out / self.input_scale if self.input_scale != 1.0 else out

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.decode(self.encode(x))

    # ------------------------------------------------------------------ training and export behaviour

    # Decoder rows kept at unit norm during training: gradients along each row removed, rows renormalised.
    unit_norm_decoder: ClassVar[bool] = True
    # Constructed with the number of features each row keeps (`k`).
    takes_k: ClassVar[bool] = False

    def training_activations(self, x: jax.Array, config) -> tuple[jax.Array, jax.Array]:
        """(activations, pre-activations) the training loss differentiates through."""
        return self.encode_with_pre(x)

    def extra_losses(self, *, f, h, residual, dead, total_variance, config) -> dict[str, jax.Array]:
        """Named loss terms (coefficients applied) added to the reconstruction error.

        f, h: activations and pre-activations [rows, d_sae]; residual = x - x_hat; dead: [d_sae] bool;
        total_variance: the batch's summed squared deviation from its mean.
        """
        return {}

    def training_stats(self) -> dict[str, jax.Array]:
        """Extra scalars the training state carries (and checkpoints) for `post_update`."""
        return {}

    def prepare_training(self, config) -> None:
        """Set parameters that training initialises from the config (b_dec aside), in place."""

    def constrain_gradients(self, grads: dict) -> dict:
        """Gradients by parameter name, adjusted before the optimiser sees them."""
        if self.unit_norm_decoder:
            w = self.W_dec[...]
            grads = dict(grads, W_dec=grads["W_dec"] - jnp.sum(grads["W_dec"] * w, -1, keepdims=True) * w)
        return grads

    def post_update(self, stats: dict, f: jax.Array, config) -> dict:
        """After the optimiser step, in place (f: this step's activations); returns the updated stats."""
        if self.unit_norm_decoder:
            w = self.W_dec[...]
            self.W_dec.set_value(w / jnp.linalg.norm(w, axis=-1, keepdims=True))
        return stats

    def saelens_fields(self) -> dict:
        """cfg.json fields beyond the ones every SAELens architecture has."""
        return {}

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
    """Trained with reconstruction + l1_coefficient * sum_i f_i |W_dec row i|, decoder rows free."""

    architecture = "standard"
    unit_norm_decoder = False

    def activate(self, h):
        return jax.nn.relu(h)

    def extra_losses(self, *, f, h, residual, dead, total_variance, config):
        norms = jnp.linalg.norm(self.W_dec[...].astype(F32), axis=-1)
        return {"l1_loss": config.l1_coefficient * jnp.sum(f * norms, -1).mean()}


class JumpReLUSAE(SAE):
    """f = relu(h) * (h > threshold), strictly greater, as in Gemma Scope."""

    architecture = "jumprelu"

    def __init__(self, d_in, d_sae, *, rngs, dtype=F32, threshold: float = 0.0, **kwargs):
        super().__init__(d_in, d_sae, rngs=rngs, dtype=dtype, **kwargs)
        self.threshold = nnx.Param(jnp.full((d_sae,), threshold, dtype), logical_axes=("sae",))

    def activate(self, h):
        return jnp.where(h > self.threshold[...].astype(F32), jax.nn.relu(h), 0.0)

    # Trained with reconstruction + l0_coefficient * L0 through the straight-through estimators of
    # Gemma Scope (rectangle kernel of width jumprelu_bandwidth) for the threshold.
    def training_activations(self, x, config):
        h = self.pre_activations(x)
        return jumprelu(h, self.threshold[...].astype(F32), config.jumprelu_bandwidth), h

    def extra_losses(self, *, f, h, residual, dead, total_variance, config):
        l0 = heaviside(h, self.threshold[...].astype(F32), config.jumprelu_bandwidth).sum(-1).mean()
        return {"l0_loss": config.l0_coefficient * l0}

    def prepare_training(self, config):
        self.threshold.set_value(jnp.full_like(self.threshold[...], config.jumprelu_init_threshold))

    def post_update(self, stats, f, config):
        stats = super().post_update(stats, f, config)
        self.threshold.set_value(jnp.maximum(self.threshold[...], 0.0))
        return stats


class TopKSAE(SAE):
    """The k largest pre-activations of each row, through a ReLU; the rest zero."""

    architecture = "topk"
    takes_k = True

    def __init__(self, d_in, d_sae, *, rngs, k: int, dtype=F32, **kwargs):
        super().__init__(d_in, d_sae, rngs=rngs, dtype=dtype, **kwargs)
        if not 0 < k <= d_sae:
            raise ValueError(f"TopK SAE: k={k} must be in [1, d_sae={d_sae}]")
        self.k = int(k)

    def activate(self, h):
        return top_k_dense(h, self.k)

    def extra_losses(self, *, f, h, residual, dead, total_variance, config):
        return {"aux_k_loss": config.aux_k_coefficient * aux_k_loss(self, h, residual, dead, total_variance)}

    def saelens_fields(self):
        return {"k": self.k, "rescale_acts_by_decoder_norm": False}


class BatchTopKSAE(JumpReLUSAE):
    """Trained with a top-(k * rows) selection over the whole batch and the AuxK loss; used (and
    saved) as a JumpReLU SAE whose threshold is one value shared by all features: the EMA
    (batch_topk_threshold_beta) of the smallest activation each batch selects.

    Every training method is its own: nothing of JumpReLU's training applies."""

    architecture = "jumprelu"
    takes_k = True

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

    def training_activations(self, x, config):
        return self.encode_batch_topk(x)

    def extra_losses(self, *, f, h, residual, dead, total_variance, config):
        return {"aux_k_loss": config.aux_k_coefficient * aux_k_loss(self, h, residual, dead, total_variance)}

    def training_stats(self):
        return {"batch_topk_threshold": jnp.zeros((), F32), "batch_topk_updates": jnp.zeros((), jnp.int32)}

    def prepare_training(self, config):
        pass  # the threshold comes from the batches seen, not from the config

    def post_update(self, stats, f, config):
        stats = SAE.post_update(self, stats, f, config)
        smallest = jnp.min(jnp.where(f > 0, f, jnp.inf))
        smallest = jnp.where(jnp.isfinite(smallest), smallest, 0.0)
        beta = config.batch_topk_threshold_beta
        old = stats["batch_topk_threshold"]
        new = jnp.where(stats["batch_topk_updates"] == 0, smallest, beta * old + (1 - beta) * smallest)
        self.threshold.set_value(jnp.full_like(self.threshold[...], new))
        return dict(stats, batch_topk_threshold=new, batch_topk_updates=stats["batch_topk_updates"] + 1)


def aux_k_loss(sae: SAE, h, residual, dead, total_variance):
    """Top dead latents (by relu(h)) reconstruct the residual x - x_hat (sparsify / OpenAI AuxK)."""
    k_aux = min(sae.d_in // 2, sae.d_sae)
    num_dead = dead.sum()
    candidates = jnp.where(dead, jax.nn.relu(h), -jnp.inf)
    values, index = jax.lax.top_k(candidates, k_aux)
    values = jnp.where(jnp.isfinite(values), values, 0.0)
    acts = jnp.put_along_axis(jnp.zeros_like(h), index, values, axis=-1, inplace=False)
    precision = matmul_precision(sae.dtype)
    e_hat = jnp.matmul(acts.astype(sae.dtype), sae.W_dec[...], preferred_element_type=F32, precision=precision)
    scale = jnp.minimum(num_dead / k_aux, 1.0)
    loss = scale * jnp.sum((e_hat - jax.lax.stop_gradient(residual)) ** 2) / total_variance
    return jnp.where(num_dead > 0, loss, 0.0)


def top_k_dense(h: jax.Array, k: int) -> jax.Array:
    """relu of the k largest entries of each row of h, in place; zeros elsewhere."""
    values, index = jax.lax.top_k(h, k)
    rows = jnp.zeros_like(h)
    return jnp.put_along_axis(rows, index, jax.nn.relu(values), axis=-1, inplace=False)


# The one architecture table: the config's name (sae.architecture) -> module. A module's `architecture` is
# its SAELens name (cfg.json): BatchTopK SAEs are saved, and load back, as the JumpReLU listed before them.
ARCHITECTURES: dict[str, type[SAE]] = {
    "relu": ReLUSAE,
    "jumprelu": JumpReLUSAE,
    "topk": TopKSAE,
    "batchtopk": BatchTopKSAE,
}
SAELENS_ARCHITECTURES: tuple[str, ...] = tuple(dict.fromkeys(cls.architecture for cls in ARCHITECTURES.values()))


def create(architecture: str, d_in: int, d_sae: int, *, k: int, rngs: nnx.Rngs, **kwargs) -> SAE:
    """A new SAE of the config's `architecture` (a key of ARCHITECTURES); `k` is read by the top-k ones."""
    cls = ARCHITECTURES[architecture]
    return cls(d_in, d_sae, rngs=rngs, **({"k": k} if cls.takes_k else {}), **kwargs)


def saelens_module(architecture: str) -> type[SAE]:
    """The module an SAE saved under SAELens name `architecture` loads as: the first in ARCHITECTURES saved so."""
    for cls in ARCHITECTURES.values():
        if cls.architecture == architecture:
            return cls
    raise ValueError(f"SAELens architecture {architecture!r} is not one of {', '.join(SAELENS_ARCHITECTURES)}")
