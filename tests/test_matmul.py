"""resstream.matmul.dense: x @ w with a weight gradient of our own (CPU), equal to autodiff's."""

from __future__ import annotations

import contextlib
import io

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from resstream import ModelConfig, Transformer, analysis
from resstream.ablation import ablation_sweep
from resstream.attention import remat_policy
from resstream.losses import cross_entropy
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
        expected = jax.grad(lambda x: jnp.sum(jnp.sin(jnp.matmul(x, w, precision="highest"))))(x[lane])
        np.testing.assert_allclose(grads[lane], expected, rtol=1e-5, atol=1e-6)


def test_the_dots_remat_policy_keeps_dense_outputs():
    """The custom_vjp hides its matmul from dots_with_no_batch_dims_saveable: without the output's
    name in the policy the backward would run every projection again."""
    f = jax.checkpoint(lambda x, w: jnp.tanh(dense(x, w)).sum(), policy=remat_policy("dots"))
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        jax.ad_checkpoint.print_saved_residuals(f, jnp.ones((8, 4)), jnp.ones((4, 6)))
    assert "f32[8,6] named 'dense_output'" in out.getvalue()


@contextlib.contextmanager
def programs_dumped_to(directory):
    """Every program JAX compiles inside the block, written to `directory` as StableHLO (for this
    process's platform: a `lax.platform_dependent` branch for another is not in it)."""
    before = jax.config.read("jax_dump_ir_to")
    jax.config.update("jax_dump_ir_to", str(directory))
    try:
        yield
    finally:
        jax.config.update("jax_dump_ir_to", before)


def matmuls(directory, *programs: str) -> list[str]:
    """The dot_general lines of every program dumped to `directory`, and of `programs` (text)."""
    texts = [path.read_text() for path in directory.glob("*.mlir")] + list(programs)
    return [line for text in texts for line in text.splitlines() if "stablehlo.dot_general" in line]


def gradient_on_accelerators(loss, params) -> list[str]:
    """`jax.grad(loss)` lowered for GPU and TPU, whose branches of `dense`'s gradient CPU lacks."""
    traced = jax.jit(jax.grad(loss)).trace(params)
    return [traced.lower(lowering_platforms=(platform,)).as_text() for platform in ("cuda", "tpu")]


def test_a_float32_model_and_its_analyses_multiply_in_float32_on_every_backend(tmp_path):
    """By default a GPU multiplies float32 matrices in TF32 and a TPU in one bfloat16 pass (about 1e-3
    relative), and the decomposition would then miss the logits. Every matmul of the forward pass,
    its gradient, the analyses and a sweep asks for HIGHEST, which on CPU changes nothing, so the
    programs are read rather than run. (A shape of its own: programs compiled before are not
    compiled, hence not dumped, again.)"""
    cfg = ModelConfig(vocab_size=40, n_layers=2, d_model=24, n_heads=3, n_ctx=12, n_kv_heads=1, unembed_bias=False)
    model = Transformer(cfg, rngs=nnx.Rngs(0))
    tokens = jax.random.randint(jax.random.key(0), (2, 12), 0, 40)
    graphdef, params = nnx.split(model)
    loss = lambda params: cross_entropy(nnx.merge(graphdef, params)(tokens[:, :-1]), tokens[:, 1:])  # noqa: E731
    with programs_dumped_to(tmp_path):
        _, cache = model.run_with_cache(tokens, record=("mlp_post",))
        analysis.decompose_logits(model, cache, split_heads=True)
        analysis.logit_attrs(model, cache, tokens, split_heads=True)
        analysis.neuron_results(model, cache, 1)
        ablation_sweep(model, tokens, "heads")
        jax.jit(jax.grad(loss))(params)
    dots = matmuls(tmp_path, *gradient_on_accelerators(loss, params))
    assert len(dots) > 20
    assert [d for d in dots if "precision = [HIGHEST, HIGHEST]" not in d] == []


def test_a_16_bit_model_takes_its_gradient_in_16_bit_matmuls(tmp_path):
    """The unembedding gives float32 logits from bfloat16 operands; its gradient's matmuls still take
    bfloat16 operands (as its forward did), not the float32 gradient of the logits."""
    cfg = ModelConfig(vocab_size=40, n_layers=2, d_model=24, n_heads=3, n_ctx=12, dtype="bfloat16")
    graphdef, params = nnx.split(Transformer(cfg, rngs=nnx.Rngs(0)))
    tokens = jax.random.randint(jax.random.key(0), (2, 13), 0, 40)
    loss = lambda params: cross_entropy(nnx.merge(graphdef, params)(tokens[:, :-1]), tokens[:, 1:])  # noqa: E731
    with programs_dumped_to(tmp_path):
        jax.jit(jax.grad(loss))(params)
    dots = matmuls(tmp_path, *gradient_on_accelerators(loss, params))
    operands = [d.split(" : (")[1].split(") ->")[0] for d in dots]
    assert len(operands) > 10 and [o for o in operands if "f32" in o] == []
