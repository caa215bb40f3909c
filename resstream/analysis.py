"""Exact decomposition of the residual stream and of the logits into per-component contributions.

Every function takes the model and a cache from `model.run_with_cache(tokens)` and returns a
`Labelled` stack: `values` [n_rows, ...] with one label per row, in TransformerLens's vocabulary
(`embed`, `pos_embed`, `{l}_attn_out`, `{l}_mlp_out`, `L{l}H{h}`, ...).

With each norm's scale frozen at its value in the forward pass, the stream and the logits are
linear in the recorded writes, so the rows sum back exactly (up to float32 rounding):
- pre-LN: component c reaches the logits as ((c - mean(c)) / scale_final * w_final) @ W_U
  (RMSNorm drops the centring); the final norm's bias and b_U form the `bias` row.
- post-LN: each norm maps every earlier component through c -> (c - mean(c)) / scale * w, and
  adds its bias as a component of its own (`{l}_ln1_bias`, `{l}_ln2_bias`); DeepNorm's
  norm(alpha * x + f(x)) first scales every earlier component (bias rows included) by alpha.
- residual=False: a write replaces the stream, so only the last write (and what later norms add)
  is a component of what follows.
Unlike TransformerLens without weight folding, the norm weight w is applied: the sums are exact.

`pos` and `batch` select positions and sequences (an int, a slice or an index array) before any
work is done, so one position of a long batch costs one position's memory. In the shapes below,
`...` is the selection's shape `[*batch, *pos]` (an int drops its axis; see `resstream.cache_view`).
Integer selections are traced (one compile for a loop over positions); out-of-range ones raise.

A point in the stream is named as in TransformerLens: `layer=l` is the stream entering layer l,
`layer=None`, -1 or n_layers the final stream (before the final norm); no other negative layer is
taken. `head_results` / `neuron_results` name a layer, not a point: there -1 is the last layer.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from resstream.cache_view import CacheView, Index, compiled_analysis
from resstream.components import F32, attn_labels, components, frozen_readout, head_rows, post_norm, write_bias
from resstream.matmul import matmul, matmul_precision
from resstream.model import Cache, Transformer


@struct.dataclass
class Labelled:
    """Rows with labels: `values` [n_rows, ...] and `labels` (one per row). A pytree.

    For decompositions the rows are additive components: `.sum()` [...] is the decomposed quantity.
    `labelled[label]` is one row [...]; iterating gives (label, row) pairs.
    """

    values: jax.Array
    labels: tuple[str, ...] = struct.field(pytree_node=False)

    def __len__(self) -> int:
        return len(self.labels)

    def __iter__(self) -> Iterator[tuple[str, jax.Array]]:
        return iter(zip(self.labels, self.values, strict=True))

    def __getitem__(self, label: str) -> jax.Array:
        try:
            return self.values[self.labels.index(label)]
        except ValueError as err:
            raise KeyError(f"no row {label!r}; rows are {list(self.labels)}") from err

    def sum(self) -> jax.Array:
        """The sum of the rows, [...]."""
        return jnp.sum(self.values, axis=0)

    def to_dict(self) -> dict[str, jax.Array]:
        """{label: row [...]}."""
        return dict(zip(self.labels, self.values, strict=True))


# ---------------------------------------------------------------------------------- pieces
def _point(model: Transformer, layer: int | None, mid: bool) -> int:
    """The point in the stream that `layer` (and `mid`) name, as a count of sublayers applied:
    layer l's input is l * sublayers_per_layer; None, -1 and n_layers are the final stream."""
    cfg, n = model.cfg, model.cfg.n_layers
    is_int = isinstance(layer, int | np.integer) and not isinstance(layer, bool)
    final = layer is None or (is_int and layer in (-1, n))
    if is_int and -n <= layer < -1:
        raise ValueError(
            f"layer={layer}: only -1 (the final stream) counts from the end here, as in TransformerLens; "
            f"pass layer={n + layer} (n_layers{layer}) for the stream entering layer {n + layer}"
        )
    if not final:
        layer = cfg.check_layer(layer, error=ValueError, hint=f" (or {n}, -1 or None for the final stream)")
    if mid and (final or cfg.attn_only):
        what = "an attention-only model has none" if cfg.attn_only else f"pass a layer 0..{n - 1}, not the final stream"
        raise ValueError(f"mid=True names the stream between a layer's attention and its MLP: {what}")
    return cfg.n_sublayers if final else layer * cfg.sublayers_per_layer + int(mid)


def _accumulated(model: Transformer, view: CacheView, stop: int, mid: bool) -> Labelled:
    """The stream [n_points, ..., d_model] at each layer's input up to sublayer count `stop`."""
    cfg, alpha = model.cfg, model.cfg.residual_scale
    x = view["embed"] + view.get("pos_embed", 0.0)
    rows, labels = [x], ["0_pre"]
    for k in range(stop):
        layer, kind = cfg.sublayer(k)
        write = view[f"{kind}_out"][layer]
        x = (x if alpha == 1.0 else x * alpha) + write if cfg.residual else write
        if cfg.norm_placement == "post":
            linear, bias = post_norm(model, view, layer, kind)
            x = linear(x) if bias is None else linear(x) + bias
        between = (k + 1) % cfg.sublayers_per_layer  # between this layer's attention and its MLP
        if (mid and between) or (not between and k + 1 < cfg.n_sublayers):
            rows.append(x)
            labels.append(f"{layer}_mid" if between else f"{layer + 1}_pre")
    if stop == cfg.n_sublayers:
        rows.append(view["resid_final"])
        labels.append("final")
    return Labelled(jnp.stack(rows), tuple(labels))


# ------------------------------------------------------------------------------ public API
@compiled_analysis
def decompose_resid(
    model: Transformer,
    cache: Cache,
    layer: int | None = None,
    *,
    mid: bool = False,
    split_heads: bool = False,
    pos: Index = None,
    batch: Index = None,
) -> Labelled:
    """Components [n, ..., d_model] that sum to the stream entering `layer` (0..n_layers-1), or to
    the final stream before the final norm (`layer` None, -1 or n_layers, as in TransformerLens;
    other negative layers are refused). `mid=True`: the stream between that layer's attention and
    its MLP. `split_heads` replaces each `{l}_attn_out` row by its heads `L{l}H{h}` and `L{l}_b_O`."""
    view = CacheView(cache, batch, pos)
    parts = components(model, view, _point(model, layer, mid), split_heads)
    return Labelled(parts.map(lambda rows: rows), tuple(parts.labels))


@compiled_analysis
def decompose_logits(
    model: Transformer, cache: Cache, *, split_heads: bool = False, pos: Index = None, batch: Index = None
) -> Labelled:
    """Direct contributions [n, ..., vocab] of every component to the logits, plus a `bias` row
    (final norm bias @ W_U + b_U). The rows sum to the logits the model produced, [...,vocab]."""
    view = CacheView(cache, batch, pos)
    parts = components(model, view, model.cfg.n_sublayers, split_heads)
    W_eff, row_scale, bias = frozen_readout(model, view)
    # One 2-D matmul per block, then one pass that orders the rows and applies the per-position
    # scale: the [n, ..., d_model] stack is never built.
    direct = parts.map(lambda rows: matmul(rows.reshape(-1, rows.shape[-1]), W_eff).reshape(*rows.shape[:-1], -1))
    if row_scale is not None:
        direct = direct * row_scale
    bias = jnp.broadcast_to(bias, direct.shape[1:])
    return Labelled(jnp.concatenate([direct, bias[None]], axis=0), (*parts.labels, "bias"))


@compiled_analysis(token_args=("tokens", "incorrect_tokens"))
def logit_attrs(
    model: Transformer,
    cache: Cache,
    tokens: Any,
    incorrect_tokens: Any = None,
    *,
    select_tokens: bool = False,
    split_heads: bool = False,
    pos: Index = None,
    batch: Index = None,
) -> Labelled:
    """Direct logit attribution [n, ...] of each component (and a `bias` row) to the logit of
    `tokens`, or to the difference logit[tokens] - logit[incorrect_tokens]; the rows sum to it.

    `tokens` and `incorrect_tokens` are ids: one id for every selected position, or by default ids
    shaped like the selection [...] (or broadcastable to it): [batch, seq] with no `pos`/`batch`,
    [batch] with `pos=p`, [batch, k] with `pos=slice(a, a + k)`. With `select_tokens=True` they are
    given for the cache's whole [batch, seq] instead, and are selected with `pos`/`batch` as the
    cache is. Any other shape is refused. Computed against the chosen columns of W_U only: no
    [n, ..., vocab] array is made."""
    view = CacheView(cache, batch, pos)
    parts = components(model, view, model.cfg.n_sublayers, split_heads)
    W_eff, row_scale, bias = frozen_readout(model, view)

    def column(ids: Any, name: str) -> tuple[jax.Array, jax.Array]:
        ids = view.token_ids(ids, name, select_tokens)
        # Traced ids are unchecked: an invalid one gives NaN, not a clamped or (if negative) wrapped column.
        valid = (ids >= 0) & (ids < W_eff.shape[1])
        return jnp.where(valid[..., None], W_eff.T[ids], jnp.nan), jnp.where(valid, bias[ids], jnp.nan)

    direction, bias_row = column(tokens, "tokens")  # [..., d_model], [...]
    if incorrect_tokens is not None:
        other_direction, other_bias = column(incorrect_tokens, "incorrect_tokens")
        direction, bias_row = direction - other_direction, bias_row - other_bias
    # Project each block on its own: no [n, ..., d_model] stack is built. A multiply-and-sum rather
    # than an einsum, which XLA serves as a batched dot over (batch, seq) by transposing the block.
    attrs = parts.map(lambda rows: jnp.sum(rows * direction, axis=-1))
    if row_scale is not None:
        attrs = attrs * row_scale[..., 0]
    return Labelled(jnp.concatenate([attrs, bias_row[None]], axis=0), (*parts.labels, "bias"))


@compiled_analysis
def accumulated_resid(
    model: Transformer,
    cache: Cache,
    layer: int | None = None,
    *,
    mid: bool = False,
    pos: Index = None,
    batch: Index = None,
) -> Labelled:
    """The stream [n_points, ..., d_model] entering each layer (`{l}_pre`), with `mid=True` also
    between attention and MLP (`{l}_mid`), from `0_pre` through `{layer}_pre`; `layer` None, -1 or
    n_layers (as in TransformerLens) goes on through `final`, the recorded stream before the final
    norm. Other negative layers are refused. Rebuilt exactly from the writes and the norm scales."""
    return _accumulated(model, CacheView(cache, batch, pos), _point(model, layer, False), mid)


@compiled_analysis
def logit_lens(
    model: Transformer, cache: Cache, *, mid: bool = False, pos: Index = None, batch: Index = None
) -> Labelled:
    """Logits [n_points, ..., vocab] read from the stream at every point of `accumulated_resid`:
    the final norm is recomputed on each point's stream (its own scale, not the final layer's),
    then W_U and b_U. The `final` row equals the model's logits."""
    resid = _accumulated(model, CacheView(cache, batch, pos), model.cfg.n_sublayers, mid)
    logits, _ = model.unembed(resid.values)
    return Labelled(logits, resid.labels)


@compiled_analysis
def head_results(
    model: Transformer, cache: Cache, layer: int | None = None, *, pos: Index = None, batch: Index = None
) -> Labelled:
    """Each head's write z_h @ W_O[h] [n, ..., d_model] (`L{l}H{h}`) and the bias row `L{l}_b_O`,
    for one layer (negative counts from the last, as in Python) or, with None, every layer
    ([n_layers * (n_heads + 1), ..., d_model]); a layer's rows sum to its `attn_out`."""
    view = CacheView(cache, batch, pos)
    cfg = model.cfg
    layers = range(cfg.n_layers) if layer is None else [cfg.check_layer(layer, error=ValueError)]
    rows, labels = [], []
    for l in layers:  # noqa: E741
        rows.append(head_rows(model, view, l))
        labels += attn_labels(model, l, split_heads=True)
    return Labelled(jnp.concatenate(rows, axis=0), tuple(labels))


@compiled_analysis
def neuron_results(model: Transformer, cache: Cache, layer: int, *, pos: Index = None, batch: Index = None) -> Labelled:
    """Each MLP neuron's write post_n * W_out[n] [d_mlp + 1, ..., d_model] (`L{l}N{n}`) plus
    `L{l}_b_out`, summing to that layer's `mlp_out`; `layer` negative counts from the last, as in
    Python. Needs `run_with_cache(tokens, record=("mlp_post",))`; select positions, since the
    result is d_mlp times a write's size."""
    if model.cfg.attn_only:
        raise ValueError("neuron_results: an attention-only model has no MLP neurons")
    layer = model.cfg.check_layer(layer, error=ValueError)
    view = CacheView(cache, batch, pos)
    W_out = model.blocks.mlp.W_out[layer].astype(F32)
    post = view["mlp_post"][layer]
    neurons = jnp.einsum("...n,nd->n...d", post, W_out, precision=matmul_precision(post, W_out))
    b_out = jnp.broadcast_to(write_bias(model.blocks.mlp.b_out, model, layer), neurons.shape[1:])
    labels = [f"L{layer}N{n}" for n in range(model.cfg.d_mlp)] + [f"L{layer}_b_out"]
    return Labelled(jnp.concatenate([neurons, b_out[None]], axis=0), tuple(labels))
