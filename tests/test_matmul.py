"""resstream.matmul.dense: x @ w with a weight gradient of our own (CPU), equal to autodiff's."""

from __future__ import annotations

import contextlib
import io

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from resstream.attention import remat_policy
from resstream.matmul import dense


@pytest.mark.parametrize("k, m", [(8, 24), (24, 8)])  # each operand the narrower one, in turn
def test_dense_and_its_gradients_equal_a_float64_matmul(k, m):
    rng = np.random.default_rng(0)
    x, w, dy = rng.normal(size=(2, 5, k)), rng.normal(size=(k, m)), rng.normal(size=(2, 5, m))
    y, vjp = jax.vjp(dense, jnp.asarray(x, jnp.float32), jnp.asarray(w, jnp.float32))
    dx, dw = vjp(jnp.asarray(dy, jnp.float32))
    np.testing.assert_allclose(y, x @ w, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(dx, dy @ w.T, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(dw, np.einsum("bnk,bnm->km", x, dy), rtol=1e-5, atol=1e-5)
    assert y.shape == (2, 5, m) and dx.dtype == jnp.float32 and dw.shape == (k, m)


def test_dense_in_16_bits_gives_float32_logits_and_16_bit_gradients():
    x, w = jnp.ones((6, 8), jnp.bfloat16), jnp.full((8, 4), 0.5, jnp.bfloat16)
    y, vjp = jax.vjp(lambda x, w: dense(x, w, out_dtype=jnp.float32), x, w)
    dx, dw = vjp(jnp.ones_like(y))
    assert y.dtype == jnp.float32 and dx.dtype == dw.dtype == jnp.bfloat16
    np.testing.assert_array_equal(y, 4.0)
    np.testing.assert_array_equal(dw, 6.0)


def test_dense_under_vmap_matches_each_lane():
    x, w = jax.random.normal(jax.random.key(0), (3, 4, 8)), jax.random.normal(jax.random.key(1), (8, 5))
    grads = jax.vmap(jax.grad(lambda x: jnp.sum(jnp.sin(dense(x, w)))))(x)
    for lane in range(3):
        expected = jax.grad(lambda x: jnp.sum(jnp.sin(x @ w)))(x[lane])
        np.testing.assert_allclose(grads[lane], expected, rtol=1e-5, atol=1e-6)


def test_the_dots_remat_policy_keeps_dense_outputs():
    """The custom_vjp hides its matmul from dots_with_no_batch_dims_saveable: without the output's
    name in the policy the backward would run every projection again."""
    f = jax.checkpoint(lambda x, w: jnp.tanh(dense(x, w)).sum(), policy=remat_policy("dots"))
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        jax.ad_checkpoint.print_saved_residuals(f, jnp.ones((8, 4)), jnp.ones((4, 6)))
    assert "f32[8,6] named 'dense_output'" in out.getvalue()
