"""The components that sum to the residual stream at a point, and the frozen readout that maps the
final stream to logits: the pieces `resstream.analysis` builds its decompositions from.

Each component is a block of rows [k, ..., d_model] read from a `CacheView` (`...` its selection of
sequences and positions). With every norm's scale frozen at its forward-pass value, the stream and
the logits are linear in these rows, which is what makes the decompositions exact.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from resstream.cache_view import CacheView
from resstream.config import SUBLAYER_NORM
from resstream.matmul import matmul, matmul_precision
from resstream.model import Transformer

F32 = jnp.float32


def write_bias(param: Any, model: Transformer, layers: int | slice) -> jax.Array:
    """A write's bias (b_O, b_out) of `layers` in float32, [d_model] or [n, d_model]: zeros for a
    model without it, whose bias row is then zero."""
    cfg = model.cfg
    return (jnp.zeros((cfg.n_layers, cfg.d_model), F32) if param is None else param[...].astype(F32))[layers]


def center(x: jax.Array, model: Transformer) -> jax.Array:
    """x [..., d_model] less its mean over d_model for LayerNorm; as it is for RMSNorm."""
    return x - jnp.mean(x, axis=-1, keepdims=True) if model.cfg.norm == "layernorm" else x


def post_norm(
    model: Transformer, view: CacheView, layer: int, kind: str
) -> tuple[Callable[[jax.Array], jax.Array], jax.Array | None]:
    """Post-LN: the norm after sublayer (layer, kind) with its scale frozen at the forward pass's
    value, as (linear, bias): norm(x) == linear(x) + bias, where linear maps each component
    [k, ..., d_model] of x on its own and bias [d_model] is None for RMSNorm."""
    name = SUBLAYER_NORM[kind]
    norm = getattr(model.blocks, name)
    w, scale = norm.w[layer].astype(F32), view[f"{name}_scale"][layer]
    bias = None if norm.b is None else norm.b[layer].astype(F32)
    return (lambda x: center(x, model) / scale * w), bias


def attn_labels(model: Transformer, layer: int, split_heads: bool) -> list[str]:
    """The labels of `layer`'s attention rows: `{layer}_attn_out`, or one per head and b_O."""
    if split_heads:
        return [f"L{layer}H{h}" for h in range(model.cfg.n_heads)] + [f"L{layer}_b_O"]
    return [f"{layer}_attn_out"]


@dataclasses.dataclass
class Blocks:
    """Components as blocks of rows [k_i, ..., d_model] in storage order, their labels in label
    order, and the permutation from one to the other (None: the same). Keeping the cache's stacked
    arrays as blocks means that no [n, ..., d_model] copy is made just to put rows in order: a
    projection maps each block and one gather on its (often much smaller) output orders the rows."""

    blocks: list[jax.Array]
    labels: list[str]
    order: np.ndarray | None = None

    def map(self, fn: Callable[[jax.Array], jax.Array]) -> jax.Array:
        out = jnp.concatenate([fn(block) for block in self.blocks], axis=0)
        return out if self.order is None else out[self.order]


def components(model: Transformer, view: CacheView, point: int, split_heads: bool) -> Blocks:
    """The components that sum to the stream at `point` (a count of sublayers applied)."""
    cfg, alpha = model.cfg, model.cfg.residual_scale
    blocks, labels = [view["embed"][None]], ["embed"]
    if "pos_embed" in view:
        blocks.append(view["pos_embed"][None])
        labels.append("pos_embed")
    if cfg.residual and cfg.norm_placement == "pre":
        return _stacked_writes(model, view, point, split_heads, Blocks(blocks, labels))
    for k in range(point):
        layer, kind = cfg.sublayer(k)
        if kind == "attn" and split_heads:
            rows = head_rows(model, view, layer)
        else:
            rows = view[f"{kind}_out"][layer][None]
        row_labels = attn_labels(model, layer, split_heads) if kind == "attn" else [f"{layer}_mlp_out"]
        if cfg.residual:  # DeepNorm: the stream so far is carried as alpha * x
            blocks = blocks if alpha == 1.0 else [x * alpha for x in blocks]
            blocks, labels = [*blocks, rows], labels + row_labels
        else:
            blocks, labels = [rows], row_labels
        if cfg.norm_placement == "post":  # frozen-scale norm: linear in every component
            linear, bias = post_norm(model, view, layer, kind)
            blocks = [linear(x) for x in blocks]
            if bias is not None:
                blocks.append(jnp.broadcast_to(bias, view["embed"].shape)[None])
                labels.append(f"{layer}_{SUBLAYER_NORM[kind]}_bias")
    return Blocks(blocks, labels)


def _stacked_writes(model: Transformer, view: CacheView, point: int, split_heads: bool, prefix: Blocks) -> Blocks:
    """Pre-LN with residual connections: every write up to `point` is a component as it stands,
    so the cache's stacked [n_layers, ...] arrays are used whole, as blocks."""
    n_layers, partial = divmod(point, model.cfg.sublayers_per_layer)
    blocks, labels = list(prefix.blocks), list(prefix.labels)
    order = None
    if n_layers:
        n_prefix = len(labels)
        attn = _all_head_rows(model, view, n_layers) if split_heads else view["attn_out"][:n_layers, None]
        per_layer = attn.shape[1]  # attention rows per layer: 1, or n_heads + 1
        blocks.append(attn.reshape(-1, *attn.shape[2:]))  # [n_layers * per_layer, ..., d_model]
        for layer in range(n_layers):
            labels += attn_labels(model, layer, split_heads)
            labels += [] if model.cfg.attn_only else [f"{layer}_mlp_out"]
        if not model.cfg.attn_only:
            blocks.append(view["mlp_out"][:n_layers])  # [n_layers, ..., d_model]
            # label order interleaves each layer's attention rows with its MLP row
            attn_rows = n_prefix + np.arange(n_layers * per_layer).reshape(n_layers, per_layer)
            mlp_rows = n_prefix + n_layers * per_layer + np.arange(n_layers)[:, None]
            order = np.concatenate([np.arange(n_prefix), np.concatenate([attn_rows, mlp_rows], 1).ravel()])
    if partial:  # the stream between layer n_layers's attention and its MLP
        blocks.append(head_rows(model, view, n_layers) if split_heads else view["attn_out"][n_layers][None])
        new_labels = attn_labels(model, n_layers, split_heads)
        if order is not None:
            order = np.concatenate([order, len(labels) + np.arange(len(new_labels))])
        labels += new_labels
    return Blocks(blocks, labels, order)


def _all_head_rows(model: Transformer, view: CacheView, n_layers: int) -> jax.Array:
    """[n_layers, n_heads + 1, ..., d_model]: each head's write, then b_O, for layers < n_layers."""
    W_O = model.blocks.attn.W_O[:n_layers].astype(F32)
    z = view["z"][:n_layers]
    heads = jnp.einsum("l...he,lhed->lh...d", z, W_O, precision=matmul_precision(z, W_O))
    b_O = write_bias(model.blocks.attn.b_O, model, slice(n_layers))
    b_O = jnp.broadcast_to(b_O.reshape(n_layers, 1, *([1] * (heads.ndim - 3)), -1), (n_layers, 1, *heads.shape[2:]))
    return jnp.concatenate([heads, b_O], axis=1)


def head_rows(model: Transformer, view: CacheView, layer: int) -> jax.Array:
    """[n_heads + 1, ..., d_model]: z_h @ W_O[h] for each head of `layer` (0..n_layers-1), then b_O,
    read from a `CacheView`. `head_results` is the same from a cache, with labels."""
    W_O = model.blocks.attn.W_O[layer].astype(F32)
    z = view["z"][layer]
    heads = jnp.einsum("...he,hed->h...d", z, W_O, precision=matmul_precision(z, W_O))
    b_O = jnp.broadcast_to(write_bias(model.blocks.attn.b_O, model, layer), heads.shape[1:])
    return jnp.concatenate([heads, b_O[None]], axis=0)


def frozen_readout(model: Transformer, view: CacheView) -> tuple[jax.Array, jax.Array | None, jax.Array]:
    """The final norm (frozen scale) and unembedding as one linear map of the final stream:
    logits = (resid @ W_eff) * row_scale + bias, with W_eff [d_model, vocab].

    For LayerNorm, ((c - mean c) / s * w) @ W_U == (c @ W_eff) / s with W_eff = w * W_U centred over
    d_model: the norm folds into a [d_model, vocab] matrix, so components go through one 2-D matmul
    and no elementwise pass over [n, ..., d_model]. Returns (W_eff, row_scale [..., 1] or None,
    bias [vocab])."""
    W_U = model.unembed_matrix.astype(F32)
    bias = jnp.zeros(model.cfg.vocab_size, F32) if model.b_U is None else model.b_U[...].astype(F32)
    if model.ln_final is None:  # post-LN: no final norm
        return W_U, None, bias
    W_eff = model.ln_final.w[...].astype(F32)[:, None] * W_U
    if model.cfg.norm == "layernorm":
        W_eff = W_eff - jnp.mean(W_eff, axis=0, keepdims=True)
        bias = bias + matmul(model.ln_final.b[...].astype(F32), W_U)
    return W_eff, 1.0 / view["ln_final_scale"], bias
