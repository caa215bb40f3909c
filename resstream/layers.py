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
from flax import nnx

from resstream.attention import causal_attention, visible
from resstream.config import ModelConfig
from resstream.devices import attention_implementation
from resstream.matmul import dense, matmul_precision
from resstream.rotary import apply_rotary
from resstream.sharding import BATCH_AXES, constrain


def normal_param(rngs: nnx.Rngs, shape: tuple[int, ...], std: float, dtype: jnp.dtype) -> nnx.Param:
    """A parameter drawn from N(0, std^2) in float32, stored as `dtype`."""
    return nnx.Param((std * jax.random.normal(rngs.params(), shape, jnp.float32)).astype(dtype))


def zeros_param(shape: tuple[int, ...], dtype: jnp.dtype) -> nnx.Param:
    """A parameter of zeros."""
    return nnx.Param(jnp.zeros(shape, dtype))


def bias_param(present: bool, shape: tuple[int, ...], dtype: jnp.dtype) -> nnx.Param | None:
    """A bias initialised at zero, or None for a model without it."""
    return zeros_param(shape, dtype) if present else None


def add_bias(y: jax.Array, b: nnx.Param | None) -> jax.Array:
    """y + b in y's dtype; y itself when the model has no such bias."""
    return y if b is None else y + b[...].astype(y.dtype)


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


class Attention(nnx.Module):
    """Causal attention with per-head weights: multi-head, or grouped-query when n_kv_heads < n_heads
    (W_K, W_V [n_kv_heads, d_model, d_head]; query head h reads key/value head h // group)."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        h, kv, d, e, pdt = cfg.n_heads, cfg.n_kv_heads, cfg.d_model, cfg.d_head, cfg.params_dtype
        self.dtype = cfg.compute_dtype
        self.implementation = attention_implementation(cfg)
        self.sliding_window = cfg.sliding_window
        self.W_Q = normal_param(rngs, (h, d, e), cfg.init_std, pdt)
        self.W_K = normal_param(rngs, (kv, d, e), cfg.init_std, pdt)
        self.W_V = normal_param(rngs, (kv, d, e), value_std(cfg), pdt)
        self.W_O = normal_param(rngs, (h, e, d), output_std(cfg), pdt)
        self.b_Q = bias_param(cfg.qkv_bias, (h, e), pdt)
        self.b_K = bias_param(cfg.qkv_bias, (kv, e), pdt)
        self.b_V = bias_param(cfg.qkv_bias, (kv, e), pdt)
        self.b_O = bias_param(cfg.attn_out_bias, (d,), pdt)

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

        def project(w: nnx.Param, b: nnx.Param | None) -> jax.Array:
            heads, _, d_head = w.shape  # w [heads, d_model, d_head] as one [d_model, heads * d_head] matrix
            w = w[...].astype(dt).transpose(1, 0, 2).reshape(d_model, heads * d_head)
            y = add_bias(dense(flat, w).reshape(-1, heads, d_head), b)
            y = constrain(y, BATCH_AXES, "tensor", None)  # heads split over the tensor axis
            return y.reshape(batch, seq, *y.shape[1:])  # [batch, seq, heads, d_head]

        q, k, v = project(self.W_Q, self.b_Q), project(self.W_K, self.b_K), project(self.W_V, self.b_V)
        if rope is not None:
            q, k = apply_rotary(q, *rope), apply_rotary(k, *rope)
        # z always comes from causal_attention: cuDNN's fused (flash) attention on an NVIDIA GPU,
        # XLA ops with a flash-style backward elsewhere. The pattern, when recorded, is computed
        # beside it for the record only, so recording cannot change the logits.
        z = causal_attention(q, k, v, self.sliding_window, self.implementation).astype(dt)
        z = constrain(z, BATCH_AXES, None, "tensor", None)
        pattern = _causal_pattern(q, k, self.sliding_window) if want_pattern else None
        if edit_z is not None:
            z = edit_z(z)
        out = dense(z.reshape(batch * seq, -1), self.W_O[...].astype(dt).reshape(-1, d_model))
        out = constrain(add_bias(out, self.b_O), BATCH_AXES, None)
        return out.reshape(batch, seq, d_model), z, pattern


def _causal_pattern(q: jax.Array, k: jax.Array, window: int | None) -> jax.Array:
    """Attention weights [batch, n_heads, seq_q, seq_k] (float32) of q [batch, seq, n_heads, d_head]
    and k [batch, seq, n_kv_heads, d_head]."""
    seq = q.shape[1]
    k = jnp.repeat(k, q.shape[2] // k.shape[2], axis=2)  # query head h reads key head h // group
    scores = jnp.einsum("bqhe,bkhe->bhqk", q, k, preferred_element_type=jnp.float32, precision=matmul_precision(q, k))
    scores = scores / math.sqrt(q.shape[-1])
    return jax.nn.softmax(jnp.where(visible(0, seq, 0, seq, window), scores, -jnp.inf), axis=-1)


class MLP(nnx.Module):
    """gelu: gelu(x W_in + b_in) W_out + b_out (tanh GELU, as GPT-2; gelu_exact: the erf form);
    swiglu: (silu(x W_gate + b_gate) * (x W_in + b_in)) W_out + b_out. Biases as cfg.mlp_bias says."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        d, m, pdt = cfg.d_model, cfg.d_mlp, cfg.params_dtype
        swiglu = cfg.mlp == "swiglu"
        self.kind = cfg.mlp
        self.dtype = cfg.compute_dtype
        self.W_in = normal_param(rngs, (d, m), value_std(cfg), pdt)
        self.b_in = bias_param(cfg.mlp_bias, (m,), pdt)
        self.W_gate = normal_param(rngs, (d, m), value_std(cfg), pdt) if swiglu else None
        self.b_gate = bias_param(cfg.mlp_bias and swiglu, (m,), pdt)
        self.W_out = normal_param(rngs, (m, d), output_std(cfg), pdt)
        self.b_out = bias_param(cfg.mlp_bias, (d,), pdt)

    def __call__(self, x: jax.Array) -> tuple[jax.Array, jax.Array]:
        """x [batch, seq, d_model] -> (mlp_out [batch, seq, d_model], post [batch, seq, d_mlp])."""
        batch, seq, d_model = x.shape
        dt = self.dtype
        # 2-D matmuls on [batch*seq, d]: XLA's CPU backend handles them far better than 3-D ones.
        flat = constrain(x.reshape(batch * seq, d_model).astype(dt), BATCH_AXES, None)
        pre = constrain(add_bias(dense(flat, self.W_in[...].astype(dt)), self.b_in), BATCH_AXES, "tensor")
        if self.kind == "swiglu":
            gate = constrain(add_bias(dense(flat, self.W_gate[...].astype(dt)), self.b_gate), BATCH_AXES, "tensor")
            post = jax.nn.silu(gate) * pre
        else:
            post = jax.nn.gelu(pre, approximate=self.kind == "gelu")
        out = constrain(add_bias(dense(post, self.W_out[...].astype(dt)), self.b_out), BATCH_AXES, None)
        return out.reshape(batch, seq, d_model), post.reshape(batch, seq, -1)
