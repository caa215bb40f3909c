"""Exact decomposition of the residual stream and of the logits into per-component contributions.

Every function takes the model and a cache from `model.run_with_cache(tokens)` and returns a
`Labelled` stack: `values` [n_rows, ...] with one label per row, in TransformerLens's vocabulary
(`embed`, `pos_embed`, `{l}_attn_out`, `{l}_mlp_out`, `L{l}H{h}`, ...).

With each norm's scale frozen at its value in the forward pass, the stream and the logits are
linear in the recorded writes, so the rows sum back exactly (up to float32 rounding):
- pre-LN: component c reaches the logits as ((c - mean(c)) / scale_final * w_final) @ W_U
  (RMSNorm drops the centring); the final norm's bias and b_U form the `bias` row.
- post-LN: each norm maps every earlier component through c -> (c - mean(c)) / scale * w, and
  adds its bias as a component of its own (`{l}_ln1_bias`, `{l}_ln2_bias`).
- residual=False: a write replaces the stream, so only the last write (and what later norms add)
  is a component of what follows.
Unlike TransformerLens without weight folding, the norm weight w is applied: the sums are exact.

`pos` and `batch` select positions and sequences (an int, a slice or an index array) before any
work is done, so one position of a long batch costs one position's memory. Out-of-range indices and
token ids raise (IndexError, TokenError) where they are known, and give NaN rows inside a user's
`jit`: never another row's values, as a JAX gather's clamping would.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
from collections.abc import Callable, Iterator
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx, struct

from resstream.model import LAYER_RECORDS, Cache, TokenError, Transformer

Index = int | slice | jax.Array | Any
F32 = jnp.float32


@struct.dataclass
class Labelled:
    """Rows with labels: `values` [n_rows, ...] and `labels` (one per row). A pytree.

    For decompositions the rows are additive components: `.sum()` is the decomposed quantity.
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
        return jnp.sum(self.values, axis=0)

    def to_dict(self) -> dict[str, jax.Array]:
        return dict(zip(self.labels, self.values, strict=True))


# ------------------------------------------------------------------------------ compilation
_DATA_ARGS = ("tokens", "incorrect_tokens")  # token ids are data even when given as a Python int


def _compiled(fn: Callable) -> Callable:
    """Run an analysis function as one compiled call, cached on the model's structure and the
    hashable arguments (layer, pos, split_heads, ...); arrays and token ids are traced. Called
    eagerly from a notebook this costs one compiled call instead of dozens of dispatched ops; inside
    a user's jit it simply inlines."""
    signature = inspect.signature(fn)

    @functools.wraps(fn)
    def wrapper(model: Transformer, cache: Cache, *args: Any, **kwargs: Any) -> Any:
        bound = signature.bind(model, cache, *args, **kwargs)
        bound.apply_defaults()
        _check_indices(model, cache, bound.arguments)
        arrays, statics = {}, []
        for name, value in list(bound.arguments.items())[2:]:
            if isinstance(value, jax.Array | np.ndarray | list) or (name in _DATA_ARGS and value is not None):
                arrays[name] = jnp.asarray(value)
            elif isinstance(value, slice):  # unhashable before Python 3.12
                statics.append((name, ("slice", value.start, value.stop, value.step)))
            else:
                statics.append((name, value))
        graphdef, state = nnx.split(model)
        out = _run_compiled(fn, graphdef, state, cache, arrays, tuple(statics))
        if any(isinstance(bound.arguments.get(name), jax.core.Tracer) for name in ("batch", "pos")):
            out = _nan_outside(cache, bound.arguments, out)
        return out

    return wrapper


@functools.partial(jax.jit, static_argnames=("fn", "graphdef", "statics"))
def _run_compiled(fn: Callable, graphdef: Any, state: Any, cache: Cache, arrays: dict, statics: tuple) -> Any:
    kwargs = dict(arrays)
    for name, value in statics:
        is_slice = isinstance(value, tuple) and len(value) == 4 and value[0] == "slice"
        kwargs[name] = slice(*value[1:]) if is_slice else value
    return fn(nnx.merge(graphdef, state), cache, **kwargs)


def _first_outside(value: Any, lo: int, hi: int) -> tuple[int, str] | None:
    """The first entry of a known integer index outside [lo, hi), and where it is ("" for a scalar).
    None if there is none, or if the value is a slice or traced (the compiled code gives NaN)."""
    if value is None or isinstance(value, slice | jax.core.Tracer):
        return None
    host = np.asarray(value)
    if not np.issubdtype(host.dtype, np.integer):  # bool masks and the like are left to JAX
        return None
    bad = np.argwhere((host < lo) | (host >= hi))
    if not len(bad):
        return None
    at = tuple(int(i) for i in bad[0])
    return int(host[at]), f" (at index {list(at)})" if at else ""


def _check_indices(model: Transformer, cache: Cache, arguments: dict[str, Any]) -> None:
    """Raise for a known out-of-range `pos`, `batch` or token id, which a JAX gather would clamp to
    the last row silently. Python ints are known even inside a user's jit, so they raise there too."""
    if "embed" in cache:  # a stats cache has none: the view's KeyError explains what to record
        n_batch, n_pos = cache["embed"].shape[:2]
        for name, n, what in (("batch", n_batch, "sequences"), ("pos", n_pos, "positions")):
            if found := _first_outside(arguments.get(name), -n, n):
                value, at = found
                label = f"{name}={value}" if not at else f"{name} entry {value}{at}"
                raise IndexError(
                    f"{label} is out of range: the cache holds {n} {what} (0..{n - 1}, or {-n}..-1 from the end)"
                )
    vocab = model.cfg.vocab_size
    for name in _DATA_ARGS:
        if found := _first_outside(arguments.get(name), 0, vocab):
            value, at = found
            fix = "token ids are not Python indices" if value < 0 else "check the tokenizer matches the model"
            raise TokenError(f"token id {value} is outside the vocabulary [0, {vocab}): `{name}` holds it{at}; {fix}")


def _nan_outside(cache: Cache, arguments: dict[str, Any], out: Labelled) -> Labelled:
    """NaN at every sequence and position that a traced `batch`/`pos` array selects out of range.
    Such indices cannot raise; the gathers clamped them to another row, and rows that do not read
    the cache at all (biases) would look valid. `out.values` is [n, *batch axes, *pos axes, ...]."""
    valid = np.ones((), bool)
    for name, n in zip(("batch", "pos"), cache["embed"].shape[:2], strict=True):
        index = arguments.get(name)
        if isinstance(index, jax.core.Tracer):
            ok = (index >= -n) & (index < n)
        else:  # checked already; an int drops its axis, None or a slice keeps one
            ok = np.ones((1,) * (1 if index is None or isinstance(index, slice) else np.ndim(index)), bool)
        valid = valid.reshape(valid.shape + (1,) * ok.ndim) & ok
    valid = valid.reshape(1, *valid.shape, *(1,) * (out.values.ndim - 1 - valid.ndim))
    return out.replace(values=jnp.where(valid, out.values, jnp.nan))


# --------------------------------------------------------------------------------- selection
def _take(x: jax.Array, axis: int, index: Index) -> jax.Array:
    return x if index is None else x[(slice(None),) * axis + (index,)]


class _View:
    """The cache with `batch` and `pos` selected, each entry sliced (and cast to f32) on first use."""

    def __init__(self, cache: Cache, batch: Index, pos: Index):
        self.cache, self.batch, self.pos, self._done = cache, batch, pos, {}

    def __contains__(self, key: str) -> bool:
        return key in self.cache

    def get(self, key: str, default: Any = None) -> Any:
        return self[key] if key in self.cache else default

    def __getitem__(self, key: str) -> jax.Array:
        if key not in self._done:
            if key not in self.cache:
                hint = "model.run_with_cache(tokens) (mode='full')"
                if key in ("resid_pre", "resid_mid", "mlp_post", "pattern"):
                    hint = f"model.run_with_cache(tokens, record=({key!r},))"
                raise KeyError(f"the cache has no {key!r}: make it with {hint}")
            x = self.cache[key]
            batch_axis = 1 if key in LAYER_RECORDS else 0
            seq_axis = batch_axis + (2 if key == "pattern" else 1)  # pattern: [.., batch, head, q, k]
            x = _take(_take(x, seq_axis, self.pos), batch_axis, self.batch)
            self._done[key] = x.astype(F32)
        return self._done[key]


def _point(model: Transformer, layer: int | None, mid: bool) -> int:
    """The point in the stream as a count of sublayers applied: layer l's input is l * per_layer."""
    cfg = model.cfg
    per_layer = cfg.sublayers_per_layer
    if layer is None:
        if mid:
            raise ValueError("mid=True needs a layer: the stream between layer's attention and MLP")
        return cfg.n_layers * per_layer
    if not -cfg.n_layers <= layer <= cfg.n_layers:  # negative counts from the last layer
        raise ValueError(
            f"layer={layer} is out of range: the model has layers 0..{cfg.n_layers - 1} "
            f"(and {cfg.n_layers} or None for the final stream)"
        )
    layer = layer + cfg.n_layers if layer < 0 else layer
    if mid and (cfg.attn_only or layer == cfg.n_layers):
        raise ValueError(
            "mid=True names the stream between a layer's attention and its MLP: "
            f"{'an attention-only model has none' if cfg.attn_only else 'not the final stream'}"
        )
    return layer * per_layer + int(mid)


def _sublayer(model: Transformer, k: int) -> tuple[int, str]:
    """Sublayer k -> (layer, "attn" | "mlp")."""
    if model.cfg.attn_only:
        return k, "attn"
    return k // 2, ("attn", "mlp")[k % 2]


def _center(x: jax.Array, model: Transformer) -> jax.Array:
    return x - jnp.mean(x, axis=-1, keepdims=True) if model.cfg.norm == "layernorm" else x


def _norm_params(model: Transformer, layer: int, kind: str) -> tuple[jax.Array, jax.Array | None]:
    norm = model.blocks.ln1 if kind == "attn" else model.blocks.ln2
    bias = None if norm.b is None else norm.b[layer].astype(F32)
    return norm.w[layer].astype(F32), bias


def _attn_labels(model: Transformer, layer: int, split_heads: bool) -> list[str]:
    if split_heads:
        return [f"L{layer}H{h}" for h in range(model.cfg.n_heads)] + [f"L{layer}_b_O"]
    return [f"{layer}_attn_out"]


@dataclasses.dataclass
class _Blocks:
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


def _components(model: Transformer, view: _View, point: int, split_heads: bool) -> _Blocks:
    """The components that sum to the stream at `point`."""
    cfg = model.cfg
    blocks = [view["embed"][None]]
    labels = ["embed"]
    if "pos_embed" in view:
        blocks.append(view["pos_embed"][None])
        labels.append("pos_embed")
    if cfg.residual and cfg.norm_placement == "pre":
        return _stacked_writes(model, view, point, split_heads, _Blocks(blocks, labels))
    for k in range(point):
        layer, kind = _sublayer(model, k)
        if kind == "attn" and split_heads:
            rows = head_rows(model, view, layer)
        else:
            rows = view[f"{kind}_out"][layer][None]
        row_labels = _attn_labels(model, layer, split_heads) if kind == "attn" else [f"{layer}_mlp_out"]
        if cfg.residual:
            blocks, labels = [*blocks, rows], labels + row_labels
        else:
            blocks, labels = [rows], row_labels
        if cfg.norm_placement == "post":  # frozen-scale norm: linear in every component
            w, b = _norm_params(model, layer, kind)
            scale = view[f"ln{1 if kind == 'attn' else 2}_scale"][layer]
            blocks = [_center(x, model) / scale * w for x in blocks]
            if b is not None:
                blocks.append(jnp.broadcast_to(b, view["embed"].shape)[None])
                labels.append(f"{layer}_ln{1 if kind == 'attn' else 2}_bias")
    return _Blocks(blocks, labels)


def _stacked_writes(model: Transformer, view: _View, point: int, split_heads: bool, prefix: _Blocks) -> _Blocks:
    """Pre-LN with residual connections: every write up to `point` is a component as it stands,
    so the cache's stacked [n_layers, ...] arrays are used whole, as blocks."""
    n_layers, partial = divmod(point, model.cfg.sublayers_per_layer)
    blocks, labels = list(prefix.blocks), list(prefix.labels)
    if model.cfg.attn_only:
        partial = 0
    order = None
    if n_layers:
        n_prefix = len(labels)
        attn = _all_head_rows(model, view, n_layers) if split_heads else view["attn_out"][:n_layers, None]
        per_layer = attn.shape[1]  # attention rows per layer: 1, or n_heads + 1
        blocks.append(attn.reshape(-1, *attn.shape[2:]))  # [n_layers * per_layer, ..., d_model]
        for layer in range(n_layers):
            labels += _attn_labels(model, layer, split_heads)
            labels += [] if model.cfg.attn_only else [f"{layer}_mlp_out"]
        if not model.cfg.attn_only:
            blocks.append(view["mlp_out"][:n_layers])  # [n_layers, ..., d_model]
            # label order interleaves each layer's attention rows with its MLP row
            attn_rows = n_prefix + np.arange(n_layers * per_layer).reshape(n_layers, per_layer)
            mlp_rows = n_prefix + n_layers * per_layer + np.arange(n_layers)[:, None]
            order = np.concatenate([np.arange(n_prefix), np.concatenate([attn_rows, mlp_rows], 1).ravel()])
    if partial:  # the stream between layer n_layers's attention and its MLP
        blocks.append(head_rows(model, view, n_layers) if split_heads else view["attn_out"][n_layers][None])
        new_labels = _attn_labels(model, n_layers, split_heads)
        if order is not None:
            order = np.concatenate([order, len(labels) + np.arange(len(new_labels))])
        labels += new_labels
    return _Blocks(blocks, labels, order)


def _all_head_rows(model: Transformer, view: _View, n_layers: int) -> jax.Array:
    """[n_layers, n_heads + 1, ..., d_model]: each head's write, then b_O, for layers < n_layers."""
    W_O = model.blocks.attn.W_O[:n_layers].astype(F32)
    heads = jnp.einsum("l...he,lhed->lh...d", view["z"][:n_layers], W_O)
    b_O = model.blocks.attn.b_O[:n_layers].astype(F32)
    b_O = jnp.broadcast_to(b_O.reshape(n_layers, 1, *([1] * (heads.ndim - 3)), -1), (n_layers, 1, *heads.shape[2:]))
    return jnp.concatenate([heads, b_O], axis=1)


def head_rows(model: Transformer, view: _View, layer: int) -> jax.Array:
    """[n_heads + 1, ..., d_model]: z_h @ W_O[h] for each head, then b_O."""
    W_O = model.blocks.attn.W_O[layer].astype(F32)
    heads = jnp.einsum("...he,hed->h...d", view["z"][layer], W_O)
    b_O = jnp.broadcast_to(model.blocks.attn.b_O[layer].astype(F32), heads.shape[1:])
    return jnp.concatenate([heads, b_O[None]], axis=0)


# ------------------------------------------------------------------------------ public API
@_compiled
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
    """Components [n, ..., d_model] that sum to the stream entering `layer` (None: the final
    stream, before the final norm); `mid=True`: the stream between that layer's attention and MLP.
    `split_heads` replaces each `{l}_attn_out` row by its heads `L{l}H{h}` and `L{l}_b_O`."""
    view = _View(cache, batch, pos)
    parts = _components(model, view, _point(model, layer, mid), split_heads)
    return Labelled(parts.map(lambda rows: rows), tuple(parts.labels))


def _readout(model: Transformer, view: _View) -> tuple[jax.Array, jax.Array | None, jax.Array]:
    """The final norm (frozen scale) and unembedding as one linear map of the final stream:
    logits = (resid @ W_eff) * row_scale + bias, with W_eff [d_model, vocab].

    For LayerNorm, ((c - mean c) / s * w) @ W_U == (c @ W_eff) / s with W_eff = w * W_U centred over
    d_model: the norm folds into a [d_model, vocab] matrix, so components go through one 2-D matmul
    and no elementwise pass over [n, ..., d_model]. Returns (W_eff, row_scale [..., 1] or None,
    bias [vocab] or [..., vocab])."""
    W_U = model.unembed_matrix.astype(F32)
    bias = model.b_U[...].astype(F32)
    if model.ln_final is None:  # post-LN: no final norm
        return W_U, None, bias
    W_eff = model.ln_final.w[...].astype(F32)[:, None] * W_U
    if model.cfg.norm == "layernorm":
        W_eff = W_eff - jnp.mean(W_eff, axis=0, keepdims=True)
        bias = bias + model.ln_final.b[...].astype(F32) @ W_U
    return W_eff, 1.0 / view["ln_final_scale"], bias


@_compiled
def decompose_logits(
    model: Transformer,
    cache: Cache,
    *,
    split_heads: bool = False,
    pos: Index = None,
    batch: Index = None,
) -> Labelled:
    """Direct contributions [n, ..., vocab] of every component to the logits, plus a `bias` row
    (final norm bias @ W_U + b_U). The rows sum to the logits the model produced."""
    view = _View(cache, batch, pos)
    parts = _components(model, view, _point(model, None, False), split_heads)
    W_eff, row_scale, bias = _readout(model, view)
    # One 2-D matmul per block (fast on CPU), then one pass that orders the rows and applies the
    # per-position scale: the [n, ..., d_model] stack is never built.
    direct = parts.map(lambda rows: (rows.reshape(-1, rows.shape[-1]) @ W_eff).reshape(*rows.shape[:-1], -1))
    labels = parts.labels
    if row_scale is not None:
        direct = direct * row_scale
    bias = jnp.broadcast_to(bias, direct.shape[1:])
    return Labelled(jnp.concatenate([direct, bias[None]], axis=0), (*labels, "bias"))


def _token_selection(tokens: Any, cache: Cache, pos: Index, batch: Index) -> jax.Array:
    """Tokens given for the whole [batch, seq] are selected like the cache; others broadcast."""
    tokens = jnp.asarray(tokens)
    if tokens.shape == cache["embed"].shape[:2]:
        tokens = _take(_take(tokens, 1, pos), 0, batch)
    return tokens


@_compiled
def logit_attrs(
    model: Transformer,
    cache: Cache,
    tokens: Any,
    incorrect_tokens: Any = None,
    *,
    split_heads: bool = False,
    pos: Index = None,
    batch: Index = None,
) -> Labelled:
    """Direct logit attribution [n, ...] of each component to the logit of `tokens` (or to the
    difference logit[tokens] - logit[incorrect_tokens]). `tokens` is an id, or ids of the full
    [batch, seq] shape (selected with `pos`/`batch`), or ids shaped like the selection.
    Computed against the chosen columns of W_U only: no [n, ..., vocab] array is made."""
    view = _View(cache, batch, pos)
    parts = _components(model, view, _point(model, None, False), split_heads)
    W_eff, row_scale, bias = _readout(model, view)
    shape = parts.blocks[0].shape[1:-1]

    def column(ids: Any) -> tuple[jax.Array, jax.Array]:
        ids = jnp.broadcast_to(_token_selection(ids, cache, pos, batch), shape)
        # Traced ids are unchecked: an invalid one gives NaN, not a clamped or (if negative) wrapped column.
        valid = (ids >= 0) & (ids < W_eff.shape[1])
        return jnp.where(valid[..., None], W_eff.T[ids], jnp.nan), jnp.where(valid, bias[ids], jnp.nan)

    direction, bias_row = column(tokens)  # [..., d_model], [...]
    if incorrect_tokens is not None:
        other_direction, other_bias = column(incorrect_tokens)
        direction, bias_row = direction - other_direction, bias_row - other_bias
    # Project each block on its own: no [n, ..., d_model] stack is built.
    # A fused multiply-and-sum: as an einsum this is a batched dot over (batch, seq), which XLA
    # serves by transposing the whole block first.
    attrs = parts.map(lambda rows: jnp.sum(rows * direction, axis=-1))
    if row_scale is not None:
        attrs = attrs * row_scale[..., 0]
    return Labelled(jnp.concatenate([attrs, bias_row[None]], axis=0), (*parts.labels, "bias"))


@_compiled
def accumulated_resid(
    model: Transformer,
    cache: Cache,
    layer: int | None = None,
    *,
    mid: bool = False,
    pos: Index = None,
    batch: Index = None,
) -> Labelled:
    """The stream [n_points, ..., d_model] at each layer's input (`{l}_pre`), with `mid=True` also
    between attention and MLP (`{l}_mid`), up to `layer` (exclusive; None: through `final`).
    Rebuilt exactly from the writes and the recorded norm scales; `final` is the recorded stream."""
    cfg = model.cfg
    view = _View(cache, batch, pos)
    stop = _point(model, layer, False)
    per_layer = cfg.sublayers_per_layer
    x = view["embed"] + view.get("pos_embed", 0.0)
    rows, labels = [x], ["0_pre"]
    for k in range(stop):
        layer_k, kind = _sublayer(model, k)
        w = view[f"{kind}_out"][layer_k]
        x = x + w if cfg.residual else w
        if cfg.norm_placement == "post":
            norm_w, norm_b = _norm_params(model, layer_k, kind)
            x = _center(x, model) / view[f"ln{1 if kind == 'attn' else 2}_scale"][layer_k] * norm_w
            x = x if norm_b is None else x + norm_b
        if (k + 1) % per_layer:
            if mid:
                rows.append(x)
                labels.append(f"{layer_k}_mid")
        elif k + 1 < cfg.n_layers * per_layer:
            rows.append(x)
            labels.append(f"{layer_k + 1}_pre")
    if stop == cfg.n_layers * per_layer:
        rows.append(view["resid_final"])
        labels.append("final")
    return Labelled(jnp.stack(rows), tuple(labels))


@_compiled
def logit_lens(
    model: Transformer,
    cache: Cache,
    *,
    mid: bool = False,
    pos: Index = None,
    batch: Index = None,
) -> Labelled:
    """Logits [n_points, ..., vocab] read from the stream at every layer: the final norm is
    recomputed on each layer's stream (its own scale, not the final layer's), then W_U and b_U.
    The `final` row equals the model's logits."""
    resid = accumulated_resid(model, cache, mid=mid, pos=pos, batch=batch)
    logits, _ = model.unembed(resid.values)
    return Labelled(logits, resid.labels)


@_compiled
def head_results(
    model: Transformer,
    cache: Cache,
    layer: int | None = None,
    *,
    pos: Index = None,
    batch: Index = None,
) -> Labelled:
    """Each head's write z_h @ W_O[h] [n, ..., d_model] (`L{l}H{h}`) and the bias row `L{l}_b_O`, for
    one layer or (None) every layer; a layer's rows sum to its `attn_out`."""
    view = _View(cache, batch, pos)
    layers = range(model.cfg.n_layers) if layer is None else [_checked_layer(model, layer)]
    rows, labels = [], []
    for l in layers:  # noqa: E741
        rows.append(head_rows(model, view, l))
        labels += [f"L{l}H{h}" for h in range(model.cfg.n_heads)] + [f"L{l}_b_O"]
    return Labelled(jnp.concatenate(rows, axis=0), tuple(labels))


@_compiled
def neuron_results(
    model: Transformer,
    cache: Cache,
    layer: int,
    *,
    pos: Index = None,
    batch: Index = None,
) -> Labelled:
    """Each MLP neuron's write post_n * W_out[n] [d_mlp + 1, ..., d_model] (`L{l}N{n}`) plus
    `L{l}_b_out`, summing to that layer's `mlp_out`. Needs `run_with_cache(tokens,
    record=("mlp_post",))`; select positions, since the result is d_mlp times a write's size."""
    if model.cfg.attn_only:
        raise ValueError("neuron_results: an attention-only model has no MLP neurons")
    layer = _checked_layer(model, layer)
    view = _View(cache, batch, pos)
    W_out = model.blocks.mlp.W_out[layer].astype(F32)
    neurons = jnp.einsum("...n,nd->n...d", view["mlp_post"][layer], W_out)
    b_out = jnp.broadcast_to(model.blocks.mlp.b_out[layer].astype(F32), neurons.shape[1:])
    labels = [f"L{layer}N{n}" for n in range(model.cfg.d_mlp)] + [f"L{layer}_b_out"]
    return Labelled(jnp.concatenate([neurons, b_out[None]], axis=0), tuple(labels))


def _checked_layer(model: Transformer, layer: int) -> int:
    n = model.cfg.n_layers
    if not -n <= layer < n:
        raise ValueError(f"layer={layer} is out of range: the model has layers 0..{n - 1}")
    return layer % n
