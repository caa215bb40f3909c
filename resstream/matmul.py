"""`dense(x, w)`: the model's projections x @ w, with a weight gradient XLA's CPU backend runs well.

A weight's gradient x^T @ dy contracts the long [batch * seq] axis, the leading axis of both
operands. XLA's CPU backend runs that matmul at about half the rate of a plain one; transposing the
narrower operand in memory first makes it a plain matmul, and the transpose costs less than it saves.
Other backends take the plain gradient.

`matmul_precision` is the precision every matmul of the model and its analyses asks for: float32
operands are multiplied in float32 on every backend.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.ad_checkpoint import checkpoint_name

# `dense`'s output is tagged with this name, for a remat policy to keep it: the custom_vjp hides the
# matmul inside from jax.checkpoint_policies.dots_with_no_batch_dims_saveable.
DENSE_OUTPUT = "dense_output"


def matmul_precision(*operands: jax.Array) -> lax.Precision | None:
    """HIGHEST when an operand is float32, else None (the default). By default JAX lets a GPU multiply
    float32 matrices in TF32 and a TPU in one bfloat16 pass (about 1e-3 relative), and a float32
    model's decomposition would then miss its logits by far more than float32 rounding; 16-bit
    operands are multiplied the same way whatever the precision."""
    return lax.Precision.HIGHEST if any(jnp.result_type(x) == jnp.float32 for x in operands) else None


def matmul(a: jax.Array, b: jax.Array) -> jax.Array:
    """`a @ b` at `matmul_precision`."""
    return jnp.matmul(a, b, precision=matmul_precision(a, b))


def dense(x: jax.Array, w: jax.Array, out_dtype: jnp.dtype | None = None) -> jax.Array:
    """x [..., k] @ w [k, m] -> [..., m], in `out_dtype` (by default x's), as one 2-D matmul."""
    y = checkpoint_name(_dense(x.reshape(-1, x.shape[-1]), w, out_dtype), DENSE_OUTPUT)
    return y.reshape(*x.shape[:-1], w.shape[1])


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _dense(x: jax.Array, w: jax.Array, out_dtype: jnp.dtype | None) -> jax.Array:
    return jnp.matmul(x, w, preferred_element_type=out_dtype, precision=matmul_precision(x, w))


def _dense_fwd(x: jax.Array, w: jax.Array, out_dtype: jnp.dtype | None) -> tuple[jax.Array, tuple]:
    return _dense(x, w, out_dtype), (x, w)


def _weight_grad_cpu(x: jax.Array, dy: jax.Array) -> jax.Array:
    """x^T @ dy [k, m] with the narrower of x [n, k] and dy [n, m] transposed in memory first (the
    optimisation barriers keep XLA from folding the transposes back into the matmul)."""
    if x.shape[1] <= dy.shape[1]:
        return matmul(lax.optimization_barrier(x.T), dy)
    return lax.optimization_barrier(matmul(lax.optimization_barrier(dy.T), x)).T


def _dense_bwd(out_dtype: jnp.dtype | None, residuals: tuple, dy: jax.Array) -> tuple[jax.Array, jax.Array]:
    x, w = residuals
    # In x's dtype: a 16-bit matmul with float32 outputs (the logits) takes its gradient in 16 bits,
    # as its forward ran, rather than as a float32 matmul.
    dy = dy.astype(x.dtype)
    precision = matmul_precision(dy, w)
    dx = lax.dot_general(dy, w, (((1,), (1,)), ((), ())), precision=precision)  # dy @ w^T, [n, k]
    plain = lambda x, dy: jnp.einsum("nk,nm->km", x, dy, precision=precision)  # noqa: E731
    dw = lax.platform_dependent(x, dy, cpu=_weight_grad_cpu, default=plain)
    return dx.astype(x.dtype), dw.astype(w.dtype)


_dense.defvjp(_dense_fwd, _dense_bwd)
