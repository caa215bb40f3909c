"""resstream.activations.gelu: jax.nn.gelu with a backward of its own, against float64 numpy."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from resstream.activations import gelu


def gelu64(x: np.ndarray, approximate: bool) -> np.ndarray:
    if approximate:
        return 0.5 * x * (1 + np.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x**3)))
    return 0.5 * x * (1 + np.vectorize(math.erf)(x / math.sqrt(2)))


@pytest.mark.parametrize("approximate", [True, False])
def test_gelu_and_its_gradient_equal_float64(approximate):
    x = np.concatenate([np.linspace(-12, 12, 481), np.random.default_rng(0).normal(size=200)])
    dy = np.random.default_rng(1).normal(size=x.shape)
    y, vjp = jax.vjp(lambda x: gelu(x, approximate), jnp.asarray(x, jnp.float32))
    (dx,) = vjp(jnp.asarray(dy, jnp.float32))
    h = 1e-6  # central differences of the float64 function: independent of our derivative
    slope = (gelu64(x + h, approximate) - gelu64(x - h, approximate)) / (2 * h)
    np.testing.assert_allclose(y, gelu64(x, approximate), rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(dx, dy * slope, rtol=1e-5, atol=1e-5)
    # No less precise than autodiff of jax.nn.gelu (its tanh form is 3e-6 off near |x| = 5).
    slope_of = lambda f: jax.vmap(jax.grad(lambda x: f(x, approximate)))(jnp.asarray(x, jnp.float32))  # noqa: E731
    ours, autodiff = slope_of(gelu), slope_of(jax.nn.gelu)
    assert np.abs(ours - slope).max() <= 1.01 * np.abs(autodiff - slope).max() + 1e-7


def test_gelu_in_16_bits_keeps_its_dtype_and_matches_autodiff_under_vmap():
    x = jax.random.normal(jax.random.key(0), (3, 64), jnp.bfloat16)
    ours = jax.vmap(jax.grad(lambda x: jnp.sum(gelu(x) ** 2)))(x)
    autodiff = jax.vmap(jax.grad(lambda x: jnp.sum(jax.nn.gelu(x) ** 2)))(x)
    assert gelu(x).dtype == ours.dtype == jnp.bfloat16
    np.testing.assert_allclose(ours.astype(np.float32), autodiff.astype(np.float32), rtol=2e-2, atol=2e-2)
