"""The sublayers a block is made of, as maths only: Norm, Attention (with rotary tables), MLP.

Parameter names follow TransformerLens (W_Q [n_heads, d_model, d_head], W_O [n_heads, d_head,
d_model], W_in [d_model, d_mlp], ...). Each module computes in `cfg.dtype` and returns, beside its
output, what the exact decomposition needs from it (a norm's scale, attention's per-head z).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from resstream.config import ModelConfig
from resstream.devices import attention_implementation
from resstream.sharding import BATCH_AXES, constrain


def normal_param(rngs: nnx.Rngs, shape: tuple[int, ...], std: float, dtype: jnp.dtype) -> nnx.Param:
    """A parameter drawn from N(0, std^2) in float32, stored as `dtype`."""
    return nnx.Param((std * jax.random.normal(rngs.params(), shape, jnp.float32)).astype(dtype))


def zeros_param(shape: tuple[int, ...], dtype: jnp.dtype) -> nnx.Param:
    """A parameter of zeros."""
    return nnx.Param(jnp.zeros(shape, dtype))


def value_std(cfg: ModelConfig) -> float:
    """Init std of W_V, W_in and W_gate: init_std, or init_std * beta with DeepNorm."""
    return cfg.init_std * cfg.deepnorm_beta if cfg.deepnorm else cfg.init_std


def output_std(cfg: ModelConfig) -> float:
    """Init std of W_O and W_out, the projections that write to the stream: GPT-2's scaled init
    init_std / sqrt(2 n_layers), or init_std * beta with DeepNorm. DeepNorm's beta = (8N)^(-1/4)
    shrinks every weight on the value path of a sublayer (W_V, W_O, the MLP's), so the update a
    write makes to the stream stays bounded while alpha scales the carried stream up: together
    they bound the model's update per step independently of depth (Wang et al. 2022). W_Q and W_K
    only shape the attention pattern and keep init_std."""
    return cfg.init_std * cfg.deepnorm_beta if cfg.deepnorm else cfg.init_std / math.sqrt(2 * cfg.n_layers)


def dropout(x: jax.Array, rate: float, key: jax.Array | None) -> jax.Array:
    """Inverted dropout of `x` at `rate` (no-op without a key or at rate 0)."""
    if key is None or rate == 0.0:
        return x
    keep = jax.random.bernoulli(key, 1.0 - rate, x.shape)
    return jnp.where(keep, x / (1.0 - rate), 0).astype(x.dtype)


class Norm(nnx.Module):
    """LayerNorm ((x - mean) / scale * w + b) or RMSNorm (x / scale * w), computed in float32.

    Returns the normalised activations and the scale [..., 1] that the exact decomposition freezes:
    LayerNorm scale = sqrt(var(x) + eps), RMSNorm scale = sqrt(mean(x**2) + eps).
    """

    def __init__(self, cfg: ModelConfig):
        self.kind = cfg.norm
        self.eps = cfg.norm_eps
        self.dtype = cfg.compute_dtype
        self.w = nnx.Param(jnp.ones((cfg.d_model,), cfg.params_dtype))
        self.b = zeros_param((cfg.d_model,), cfg.params_dtype) if cfg.norm == "layernorm" else None

    def __call__(self, x: jax.Array) -> tuple[jax.Array, jax.Array]:
        x = x.astype(jnp.float32)
        if self.kind == "layernorm":
            x = x - jnp.mean(x, axis=-1, keepdims=True)
        scale = jnp.sqrt(jnp.mean(jnp.square(x), axis=-1, keepdims=True) + self.eps)
        y = x / scale * self.w[...].astype(jnp.float32)
        if self.b is not None:
            y = y + self.b[...].astype(jnp.float32)
        return y.astype(self.dtype), scale


def rotary_tables(seq: int, d_head: int, base: float) -> tuple[jax.Array, jax.Array]:
    """cos and sin tables [seq, d_head] for GPT-NeoX-style rotary embeddings (rotate-half)."""
    inv_freq = base ** (-np.arange(0, d_head, 2, dtype=np.float64) / d_head)
    angles = np.arange(seq, dtype=np.float64)[:, None] * inv_freq[None, :]
    angles = np.concatenate([angles, angles], axis=-1)
    return jnp.asarray(np.cos(angles), jnp.float32), jnp.asarray(np.sin(angles), jnp.float32)


def _apply_rotary(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """x [batch, seq, n_heads, d_head]; cos, sin [seq, d_head]."""
    half = x.shape[-1] // 2
    rotated = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
    cos, sin = cos[:, None, :], sin[:, None, :]
    return (x.astype(jnp.float32) * cos + rotated.astype(jnp.float32) * sin).astype(x.dtype)


class Attention(nnx.Module):
    """Causal multi-head attention with per-head weights."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        h, d, e, pdt = cfg.n_heads, cfg.d_model, cfg.d_head, cfg.params_dtype
        self.dtype = cfg.compute_dtype
        self.implementation = attention_implementation(cfg)
        self.W_Q = normal_param(rngs, (h, d, e), cfg.init_std, pdt)
        self.W_K = normal_param(rngs, (h, d, e), cfg.init_std, pdt)
        self.W_V = normal_param(rngs, (h, d, e), value_std(cfg), pdt)
        self.W_O = normal_param(rngs, (h, e, d), output_std(cfg), pdt)
        self.b_Q = zeros_param((h, e), pdt)
        self.b_K = zeros_param((h, e), pdt)
        self.b_V = zeros_param((h, e), pdt)
        self.b_O = zeros_param((d,), pdt)

    def __call__(
        self,
        x: jax.Array,
        rope: tuple[jax.Array, jax.Array] | None,
        want_pattern: bool,
        edit_z: Callable[[jax.Array], jax.Array] | None = None,
    ) -> tuple[jax.Array, jax.Array, jax.Array | None]:
        """x [batch, seq, d_model] -> (attn_out [batch, seq, d_model],
        z [batch, seq, n_heads, d_head], pattern [batch, n_heads, seq_q, seq_k] or None).
        `edit_z` (head ablation) changes z before W_O."""
        batch, seq, d_model = x.shape
        dt = self.dtype
        flat = constrain(x.reshape(batch * seq, d_model).astype(dt), BATCH_AXES, None)

        def project(w: nnx.Param, b: nnx.Param) -> jax.Array:
            y = jnp.einsum("nd,hde->nhe", flat, w[...].astype(dt)) + b[...].astype(dt)
            y = constrain(y, BATCH_AXES, "tensor", None)  # heads split over the tensor axis
            return y.reshape(batch, seq, *y.shape[1:])  # [batch, seq, n_heads, d_head]

        q, k, v = project(self.W_Q, self.b_Q), project(self.W_K, self.b_K), project(self.W_V, self.b_V)
        if rope is not None:
            q, k = _apply_rotary(q, *rope), _apply_rotary(k, *rope)
        # z always comes from jax.nn.dot_product_attention: cuDNN's fused (flash) attention on an
        # NVIDIA GPU, XLA's elsewhere. The pattern, when recorded, is computed beside it for the
        # record only, so recording cannot change the logits.
        z = jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation=self.implementation).astype(dt)
        z = constrain(z, BATCH_AXES, None, "tensor", None)
        pattern = _causal_pattern(q, k) if want_pattern else None
        if edit_z is not None:
            z = edit_z(z)
        out = jnp.einsum("nhe,hed->nd", z.reshape(batch * seq, *z.shape[2:]), self.W_O[...].astype(dt))
        out = constrain(out + self.b_O[...].astype(dt), BATCH_AXES, None)
        return out.reshape(batch, seq, d_model), z, pattern


def _causal_pattern(q: jax.Array, k: jax.Array) -> jax.Array:
    """Attention weights [batch, n_heads, seq_q, seq_k] (float32) of q, k [batch, seq, n_heads, d_head]."""
    seq = q.shape[1]
    scores = jnp.einsum("bqhe,bkhe->bhqk", q, k, preferred_element_type=jnp.float32) / math.sqrt(q.shape[-1])
    causal = jnp.tril(jnp.ones((seq, seq), dtype=bool))
    return jax.nn.softmax(jnp.where(causal, scores, -jnp.inf), axis=-1)


class MLP(nnx.Module):
    """gelu: gelu(x W_in + b_in) W_out + b_out (tanh GELU, as GPT-2);
    swiglu: (silu(x W_gate + b_gate) * (x W_in + b_in)) W_out + b_out."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        d, m, pdt = cfg.d_model, cfg.d_mlp, cfg.params_dtype
        self.kind = cfg.mlp
        self.dtype = cfg.compute_dtype
        self.W_in = normal_param(rngs, (d, m), value_std(cfg), pdt)
        self.b_in = zeros_param((m,), pdt)
        self.W_gate = normal_param(rngs, (d, m), value_std(cfg), pdt) if cfg.mlp == "swiglu" else None
        self.b_gate = zeros_param((m,), pdt) if cfg.mlp == "swiglu" else None
        self.W_out = normal_param(rngs, (m, d), output_std(cfg), pdt)
        self.b_out = zeros_param((d,), pdt)

    def __call__(self, x: jax.Array) -> tuple[jax.Array, jax.Array]:
        """x [batch, seq, d_model] -> (mlp_out [batch, seq, d_model], post [batch, seq, d_mlp])."""
        batch, seq, d_model = x.shape
        dt = self.dtype
        # 2-D matmuls on [batch*seq, d]: XLA's CPU backend handles them far better than 3-D ones.
        flat = constrain(x.reshape(batch * seq, d_model).astype(dt), BATCH_AXES, None)
        pre = constrain(flat @ self.W_in[...].astype(dt) + self.b_in[...].astype(dt), BATCH_AXES, "tensor")
        if self.kind == "swiglu":
            gate = constrain(flat @ self.W_gate[...].astype(dt) + self.b_gate[...].astype(dt), BATCH_AXES, "tensor")
            post = jax.nn.silu(gate) * pre
        else:
            post = jax.nn.gelu(pre, approximate=True)
        out = constrain(post @ self.W_out[...].astype(dt) + self.b_out[...].astype(dt), BATCH_AXES, None)
        return out.reshape(batch, seq, d_model), post.reshape(batch, seq, -1)
