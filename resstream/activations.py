"""GELU with a backward pass of its own: one elementwise pass per direction on XLA's CPU backend.

Autodiff of `jax.nn.gelu` leaves XLA an expression whose tanh (or erf) both the rematerialised
forward (gelu(x), the input of W_out's gradient) and the backward (gelu'(x) * da) read; XLA's CPU
backend then writes that intermediate to memory, a third pass over the [batch * seq, d_mlp] array.
Here the backward computes gelu'(x) itself, from x alone, fused into its product with da.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp

_SQRT_2_OVER_PI = math.sqrt(2.0 / math.pi)
_CUBIC = 0.044715


@functools.partial(jax.custom_vjp, nondiff_argnums=(1,))
def gelu(x: jax.Array, approximate: bool = True) -> jax.Array:
    """`jax.nn.gelu(x, approximate)`, elementwise, any shape; its gradient is computed from x."""
    return jax.nn.gelu(x, approximate=approximate)


def _gelu_fwd(x: jax.Array, approximate: bool) -> tuple[jax.Array, jax.Array]:
    return gelu(x, approximate), x


def _gelu_derivative(x: jax.Array, approximate: bool) -> jax.Array:
    """d gelu / dx, in float32."""
    x = x.astype(jnp.float32)
    if approximate:  # 0.5 x (1 + tanh(u)), u = sqrt(2 / pi) (x + 0.044715 x^3)
        # The tanh form, as autodiff of jax.nn.gelu computes it (and as precise): a form without
        # 1 - t^2 (from sigmoids or exp(-2|u|)) is more precise near |x| = 5 but costs XLA's CPU
        # backend more than the pass this function saves.
        x2 = x * x
        t = jnp.tanh(x * (_SQRT_2_OVER_PI + (_SQRT_2_OVER_PI * _CUBIC) * x2))
        return 0.5 * (1.0 + t) + 0.5 * x * (1.0 - t * t) * (_SQRT_2_OVER_PI + (3 * _SQRT_2_OVER_PI * _CUBIC) * x2)
    cdf = 0.5 * (1.0 + jax.lax.erf(x / math.sqrt(2.0)))  # x Phi(x) -> Phi(x) + x phi(x)
    return cdf + x * jnp.exp(-0.5 * x * x) / math.sqrt(2.0 * math.pi)


def _gelu_bwd(approximate: bool, x: jax.Array, dy: jax.Array) -> tuple[jax.Array]:
    return ((dy.astype(jnp.float32) * _gelu_derivative(x, approximate)).astype(dy.dtype),)


gelu.defvjp(_gelu_fwd, _gelu_bwd)
