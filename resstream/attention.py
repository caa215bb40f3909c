"""Causal attention z = softmax(q k^T / sqrt(d_head) + mask) v, with a backward pass of our own.

On an NVIDIA GPU with 16-bit compute, cuDNN's fused (flash) attention through
`jax.nn.dot_product_attention`. Everywhere else, `xla_attention`: plain XLA ops whose gradient is
written out as flash attention computes it, instead of left to autodiff of a masked softmax:

- the forward keeps only q, k, v, z and the log-sum-exp of each query's scores [.., seq_q]; the
  backward recomputes the probabilities from them (exp(s - lse)), so no [seq, seq] array is kept
  between the passes;
- the softmax's backward uses rowsum(dz * z) (a [seq, d_head] reduction) in place of
  rowsum(dp * p) (a [seq, seq] one);
- queries are taken in blocks, each against only the keys it can see (causal, and the sliding
  window), so the masked-out upper triangle is mostly never computed;
- the backward recomputes the probabilities keys first, so that two of its three matmuls over them
  contract their last axis (no transposed copy).

Fewer passes over [seq, seq] arrays is what XLA's CPU backend needs (benchmarks/train_vs_pytorch.py);
the result is softmax attention, equal to jax.nn.dot_product_attention's to float rounding.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name

from resstream.matmul import DENSE_OUTPUT, matmul_precision

# Queries per block, each block against the keys it can see: smaller blocks skip more of the masked
# triangle but issue more, smaller matmuls (benchmarks/train_vs_pytorch.py chose 64 on CPU). At most
# MAX_BLOCKS blocks, so that long sequences do not unroll into many small ops.
QUERY_BLOCK = 64
MAX_BLOCKS = 16
# The names under which the forward's residuals are tagged, for a remat policy to keep them.
ATTENTION_RESIDUALS = ("attention_z", "attention_lse")
# The primitive that runs cuDNN's fused forward inside jax.nn.dot_product_attention. Its outputs (z
# and the softmax statistics) are the backward's residuals; a policy that does not keep them runs
# the forward kernel again in the backward pass.
CUDNN_FORWARD = "dot_product_attention_fwd_wrapper"


def causal_attention(
    q: jax.Array, k: jax.Array, v: jax.Array, window: int | None = None, implementation: str = "xla"
) -> jax.Array:
    """q [batch, seq, n_heads, d_head], k and v [batch, seq, n_kv_heads, d_head] (query head h reads
    key/value head h // (n_heads // n_kv_heads)) -> z [batch, seq, n_heads, d_head] in q's dtype.
    `window`: each query sees itself and the `window - 1` positions before it (None: all earlier).
    `implementation`: "cudnn" (NVIDIA GPUs, 16-bit) or "xla"."""
    if implementation == "cudnn":
        local = None if window is None else (window - 1, 0)
        return jax.nn.dot_product_attention(
            q, k, v, is_causal=True, local_window_size=local, implementation="cudnn"
        ).astype(q.dtype)
    return xla_attention(q, k, v, window)


def _blocks(seq: int, window: int | None) -> list[tuple[int, int, int, int]]:
    """(query start, query stop, key start, key stop) for each block of queries: the keys from the
    first one the block's first query may see (window) to its last query's own position (causal)."""
    size = max(QUERY_BLOCK, -(-seq // MAX_BLOCKS))
    blocks = []
    for start in range(0, seq, size):
        stop = min(start + size, seq)
        blocks.append((start, stop, 0 if window is None else max(0, start - window + 1), stop))
    return blocks


def _einsum(spec: str, a: jax.Array, b: jax.Array) -> jax.Array:
    """`jnp.einsum` of two operands with float32 results, at `matmul_precision`."""
    return jnp.einsum(spec, a, b, preferred_element_type=jnp.float32, precision=matmul_precision(a, b))


def visible(q_at: int, q_len: int, k_at: int, k_len: int, window: int | None) -> jax.Array:
    """[q_len, k_len]: whether the query at position q_at + i may look at the key at k_at + j."""
    q_pos = q_at + jnp.arange(q_len)[:, None]
    k_pos = k_at + jnp.arange(k_len)[None, :]
    mask = k_pos <= q_pos
    if window is not None:
        mask &= k_pos > q_pos - window
    return mask


def _scores(q: jax.Array, k: jax.Array, q_at: int, k_at: int, window: int | None) -> jax.Array:
    """Masked scaled scores [batch, kv, group, q_len, k_len] (float32) of the query block starting
    at position q_at against the key block starting at k_at; -inf where a query may not look."""
    s = _einsum("bkgqd,bksd->bkgqs", q, k) / math.sqrt(q.shape[-1])
    return jnp.where(visible(q_at, q.shape[3], k_at, k.shape[2], window), s, -jnp.inf)


def _scores_transposed(q: jax.Array, k: jax.Array, q_at: int, k_at: int, window: int | None) -> jax.Array:
    """`_scores` laid out keys first: [batch, kv, group, k_len, q_len]."""
    s = _einsum("bksd,bkgqd->bkgsq", k, q) / math.sqrt(q.shape[-1])
    return jnp.where(visible(q_at, q.shape[3], k_at, k.shape[2], window).T, s, -jnp.inf)


def _grouped(q: jax.Array, n_kv: int) -> jax.Array:
    """q [batch, seq, n_heads, d_head] -> [batch, n_kv, group, seq, d_head]."""
    b, t, h, d = q.shape
    return q.reshape(b, t, n_kv, h // n_kv, d).transpose(0, 2, 3, 1, 4)


def _ungrouped(z: jax.Array) -> jax.Array:
    """[batch, n_kv, group, seq, d_head] -> [batch, seq, n_heads, d_head]."""
    b, kv, g, t, d = z.shape
    return z.transpose(0, 3, 1, 2, 4).reshape(b, t, kv * g, d)


def _forward(q: jax.Array, k: jax.Array, v: jax.Array, window: int | None) -> tuple[jax.Array, jax.Array]:
    """Grouped q [b, kv, g, t, d], k and v [b, kv, t, d] -> (z [b, kv, g, t, d], lse [b, kv, g, t])."""
    zs, lses = [], []
    for q0, q1, k0, k1 in _blocks(q.shape[3], window):
        s = _scores(q[:, :, :, q0:q1], k[:, :, k0:k1], q0, k0, window)
        top = jnp.max(s, axis=-1, keepdims=True)  # finite: every query sees itself
        p = jnp.exp(s - top)
        total = jnp.sum(p, axis=-1, keepdims=True)
        z = _einsum("bkgqs,bksd->bkgqd", p.astype(v.dtype), v[:, :, k0:k1])
        zs.append((z / total).astype(q.dtype))
        lses.append((top + jnp.log(total))[..., 0])
    return jnp.concatenate(zs, axis=3), jnp.concatenate(lses, axis=3)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _attention(q: jax.Array, k: jax.Array, v: jax.Array, window: int | None) -> tuple[jax.Array, jax.Array]:
    return _forward(q, k, v, window)


def _attention_fwd(q, k, v, window):
    z, lse = _forward(q, k, v, window)
    z, lse = checkpoint_name(z, ATTENTION_RESIDUALS[0]), checkpoint_name(lse, ATTENTION_RESIDUALS[1])
    return (z, lse), (q, k, v, z, lse)


def _attention_bwd(window, residuals, cotangents):
    q, k, v, z, lse = residuals
    dz = cotangents[0]  # lse is an output only so that remat can keep it; nothing reads it
    scale = 1.0 / math.sqrt(q.shape[-1])
    # rowsum(dp * p) = rowsum(dz * z) per query: the softmax backward without a [seq, seq] reduction.
    # An einsum: XLA's CPU backend runs the multiply-and-sum of two 5-D operands many times slower.
    delta = _einsum("bkgqd,bkgqd->bkgq", dz, z)
    dq_blocks = []
    dk = jnp.zeros(k.shape, jnp.float32)
    dv = jnp.zeros(v.shape, jnp.float32)
    # The probabilities are recomputed keys first, p^T [.., k_len, q_len]: then dv = p^T dz and
    # dk = ds^T q contract p's last axis, and only dq contracts its leading one. In the [q, k] layout
    # two of the three would, and XLA's CPU backend transposes such an operand in memory first.
    for q0, q1, k0, k1 in _blocks(q.shape[3], window):
        qb, kb, vb, dzb = q[:, :, :, q0:q1], k[:, :, k0:k1], v[:, :, k0:k1], dz[:, :, :, q0:q1]
        p_t = jnp.exp(_scores_transposed(qb, kb, q0, k0, window) - lse[:, :, :, None, q0:q1])
        dp_t = _einsum("bksd,bkgqd->bkgsq", vb, dzb)
        ds_t = (p_t * (dp_t - delta[:, :, :, None, q0:q1]) * scale).astype(q.dtype)
        dq_blocks.append(_einsum("bkgsq,bksd->bkgqd", ds_t, kb))
        dk = dk.at[:, :, k0:k1].add(_einsum("bkgsq,bkgqd->bksd", ds_t, qb))
        dv = dv.at[:, :, k0:k1].add(_einsum("bkgsq,bkgqd->bksd", p_t.astype(v.dtype), dzb))
    dq = jnp.concatenate(dq_blocks, axis=3)
    return dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype)


_attention.defvjp(_attention_fwd, _attention_bwd)


def remat_policy(remat: str) -> Callable[..., bool] | None:
    """What a layer's backward pass keeps (`ModelConfig.remat`): "dots" keeps the matmul outputs
    (`resstream.matmul.dense`'s by name, since its custom_vjp hides the matmul from the dots policy)
    and attention's z and log-sum-exp (its backward's residuals, so attention is not run again: ours
    by name, cuDNN's as the outputs of its forward primitive); "full" keeps nothing but the layer's
    input."""
    if remat == "full":
        return None
    policies = jax.checkpoint_policies
    dots = policies.save_from_both_policies(
        policies.dots_with_no_batch_dims_saveable, policies.save_only_these_names(DENSE_OUTPUT, *ATTENTION_RESIDUALS)
    )
    return policies.save_from_both_policies(dots, _is_cudnn_forward)


def _is_cudnn_forward(primitive: jax.extend.core.Primitive, *_: Any, **__: Any) -> bool:
    return primitive.name == CUDNN_FORWARD


def xla_attention(q: jax.Array, k: jax.Array, v: jax.Array, window: int | None = None) -> jax.Array:
    """Causal attention in XLA ops with a flash-style backward (see the module docstring); shapes as
    `causal_attention`."""
    n_kv = k.shape[2]
    grouped = lambda x: x.transpose(0, 2, 1, 3)  # noqa: E731  [b, t, kv, d] -> [b, kv, t, d]
    z, _ = _attention(_grouped(q, n_kv), grouped(k), grouped(v), window)
    return _ungrouped(z)
