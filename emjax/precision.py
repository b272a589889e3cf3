"""Matmul precision: float32 means float32 on every backend.

By default GPUs run float32 matmuls as TF32 (10-bit mantissa products) and
TPUs as one bf16 pass, so a float32 model is silently ~1e-3 off its CPU
result there. emjax asks for HIGHEST precision on every matmul whose operands
are float32 (models, SAEs, LoRA, the derivation's jvp, the similarity
kernels), so float32 results agree across backends to float32 rounding.
Operands in bfloat16 (or float16) are left alone: products in that dtype,
accumulated in float32.

The one setting that trades this for speed is JAX's own default matmul
precision. When it is set, emjax leaves every matmul to it:

    JAX_DEFAULT_MATMUL_PRECISION=tensorfloat32 python -m emjax.main ...   # TF32 on GPU
    with jax.default_matmul_precision("tensorfloat32"): ...               # in Python

It is read when a function is traced (it is part of jit's cache key), so set
it before the first call.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax


def user_precision() -> str | None:
    """JAX's default matmul precision as the user set it (flag, environment or context), else None."""
    return jax.config.jax_default_matmul_precision


def matmul_precision(*dtypes) -> lax.Precision | None:
    """The `precision=` for a matmul over operands of `dtypes`.

    HIGHEST when every operand is float32 and the user has not set JAX's
    default matmul precision; None (that default, i.e. the backend's or the
    user's choice) otherwise.
    """
    if user_precision() is not None:
        return None
    if dtypes and all(jnp.dtype(d) == jnp.float32 for d in dtypes):
        return lax.Precision.HIGHEST
    return None
