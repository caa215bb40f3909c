"""resstream.attention against a float64 masked softmax written out in numpy: values and gradients,
for multi-head and grouped-query attention, sliding windows, and sequences cut into many blocks."""

from types import SimpleNamespace

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import resstream.attention as attention
from conftest import stub_cudnn_checks
from resstream.attention import causal_attention
from resstream.devices import cudnn_max_d_head


def _reference(q, k, v, window):
    """softmax(q k^T / sqrt(d) + mask) v in float64; q [b, t, h, d], k and v [b, t, kv, d]."""
    q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
    group = q.shape[2] // k.shape[2]
    k, v = np.repeat(k, group, axis=2), np.repeat(v, group, axis=2)
    seq = q.shape[1]
    s = np.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(q.shape[-1])
    pos = np.arange(seq)
    visible = pos[None, :] <= pos[:, None]
    if window is not None:
        visible &= pos[None, :] > pos[:, None] - window
    s = np.where(visible, s, -np.inf)
    p = np.exp(s - s.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    return np.einsum("bhqk,bkhd->bqhd", p, v)


def _inputs(seq: int, heads: int, kv_heads: int, d_head: int = 8, batch: int = 2):
    keys = jax.random.split(jax.random.key(seq * 100 + heads * 10 + kv_heads), 4)
    q = jax.random.normal(keys[0], (batch, seq, heads, d_head))
    k = jax.random.normal(keys[1], (batch, seq, kv_heads, d_head))
    v = jax.random.normal(keys[2], (batch, seq, kv_heads, d_head))
    dz = jax.random.normal(keys[3], (batch, seq, heads, d_head))
    return q, k, v, dz


CASES = [  # (seq, heads, kv_heads, window)
    (21, 4, 2, None),  # grouped-query, a sequence that is not a multiple of the block
    (21, 2, 1, 5),  # multi-query with a sliding window shorter than a block
    (32, 2, 2, 12),  # multi-head, a window longer than a block
]


@pytest.mark.parametrize(("seq", "heads", "kv_heads", "window"), CASES)
def test_values_and_gradients_equal_a_float64_masked_softmax(monkeypatch, seq, heads, kv_heads, window):
    """Blocks of 8 queries (so every case spans several blocks, the last one short): z and the
    gradients of <z, dz> with respect to q, k, v equal those of the float64 reference."""
    monkeypatch.setattr(attention, "QUERY_BLOCK", 8)
    q, k, v, dz = _inputs(seq, heads, kv_heads)
    z = causal_attention(q, k, v, window)
    assert z.shape == q.shape and z.dtype == q.dtype
    np.testing.assert_allclose(z, _reference(q, k, v, window), atol=2e-6)

    grads = jax.grad(lambda q, k, v: jnp.sum(causal_attention(q, k, v, window) * dz), argnums=(0, 1, 2))(q, k, v)
    eps = 1e-6  # central differences of the float64 reference
    for index, (grad, x) in enumerate(zip(grads, (q, k, v), strict=True)):
        direction = np.asarray(jax.random.normal(jax.random.key(index), x.shape), np.float64)
        args = [np.asarray(a, np.float64) for a in (q, k, v)]
        plus, minus = list(args), list(args)
        plus[index], minus[index] = args[index] + eps * direction, args[index] - eps * direction
        numeric = np.sum((_reference(*plus, window) - _reference(*minus, window)) * np.asarray(dz)) / (2 * eps)
        np.testing.assert_allclose(np.sum(np.asarray(grad, np.float64) * direction), numeric, rtol=1e-4)


def test_blocks_cover_every_query_once_and_only_the_keys_it_may_see(monkeypatch):
    monkeypatch.setattr(attention, "QUERY_BLOCK", 8)
    for seq, window in [(21, None), (21, 5), (64, 12), (1, None)]:
        blocks = attention._blocks(seq, window)
        assert [q0 for q0, *_ in blocks] == list(range(0, seq, 8))
        assert blocks[-1][1] == seq
        for q0, q1, k0, k1 in blocks:
            assert k1 == q1 and k0 == (0 if window is None else max(0, q0 - window + 1))
    monkeypatch.setattr(attention, "MAX_BLOCKS", 4)
    assert len(attention._blocks(100, None)) == 4  # long sequences take longer blocks, not more


def test_bfloat16_inputs_give_bfloat16_z_close_to_float32():
    q, k, v, _ = _inputs(40, 4, 2)
    z = causal_attention(*(x.astype(jnp.bfloat16) for x in (q, k, v)))
    assert z.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(z, np.float32), _reference(q, k, v, None), atol=3e-2)


def test_remat_dots_keeps_cudnn_attentions_outputs_for_the_backward(monkeypatch, capsys):
    """On an NVIDIA GPU, remat "dots" keeps cuDNN's z and softmax statistics, so the backward does
    not run the fused forward again. Traced here, never compiled, with cuDNN's version check stubbed
    (jax's own module; skipped if a JAX version moves it)."""
    stub_cudnn_checks(monkeypatch)
    q = jnp.ones((2, 128, 4, 64), jnp.bfloat16)

    def loss(q, k, v):
        return jnp.sum(causal_attention(q, k, v, None, "cudnn").astype(jnp.float32) ** 2)

    for remat, kept in (("dots", 2), ("full", 0)):
        jax.ad_checkpoint.print_saved_residuals(jax.checkpoint(loss, policy=attention.remat_policy(remat)), q, q, q)
        saved = capsys.readouterr().out
        assert saved.count(f"output of {attention.CUDNN_FORWARD}") == kept, saved


@pytest.mark.parametrize("capability", ["8.0", "9.0"])
def test_cudnn_takes_the_head_widths_resstream_gives_it_on_each_gpu(monkeypatch, capability):
    """`cudnn_max_d_head` agrees with jax's own check of cuDNN's head width: on a GPU of this
    compute capability the widest head it allows lowers (gradient included) and 8 more are refused.
    Lowered for CUDA here, never compiled, with jax's version and capability checks stubbed."""
    stub_cudnn_checks(monkeypatch, capability)
    widest = cudnn_max_d_head(SimpleNamespace(compute_capability=capability))

    def lower(d_head: int) -> str:
        q = jax.ShapeDtypeStruct((1, 128, 2, d_head), jnp.bfloat16)
        loss = lambda q, k, v: jnp.sum(causal_attention(q, k, v, None, "cudnn").astype(jnp.float32))  # noqa: E731
        return jax.jit(jax.grad(loss, argnums=(0, 1, 2))).trace(q, q, q).lower(lowering_platforms=("cuda",)).as_text()

    assert "cudnn" in lower(widest)
    with pytest.raises(NotImplementedError, match="head dim"):
        lower(widest + 8)
