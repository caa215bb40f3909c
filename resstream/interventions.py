"""Interventions as data: which components to change (`Ablation`, boolean masks) and the values
written instead (`Replacement`), with the component labels that name them.

Components are named as in TransformerLens: `L{l}` (a whole layer: its attention and MLP writes),
`{l}_attn_out`, `{l}_mlp_out`, `L{l}H{h}` (one head: its z before W_O). Methods:
- "zero": the write (or the head's z) becomes zero;
- "mean": it becomes its mean over a reference batch or a dataset, per position;
- "resample": it becomes what the model wrote on another batch of the same shape, sequence by sequence;
- "delete": the sublayer or layer is removed: the stream leaves it as it came in (for a pre-LN
  residual model the same as "zero"; for a plain or post-LN network it also bypasses the layer's
  norms (and DeepNorm's scaling of the stream by alpha), which is what "removing a layer" means in
  the deletion experiments).

The model's ordinary forward pass takes both:

    >>> ablation = make_ablation(model.cfg, ["3_attn_out", "L1H2"], "zero")
    >>> logits = model(tokens, ablation=ablation, replacement=zero_replacement(model.cfg))

so `jax.vmap` over a stack of masks, `jax.jit` and sharding work as usual. The experiments built on
them live in `resstream.ablation` and `resstream.patching`.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from resstream.config import ModelConfig
from resstream.model import Transformer, check_tokens

METHODS = ("zero", "mean", "resample", "delete")
GRANULARITIES = ("layers", "sublayers", "heads")


@struct.dataclass
class Ablation:
    """Which writes to change, as boolean masks (stacked: a leading [n_layers] axis; the scan hands
    each layer its slice). Add a leading axis of your own to `jax.vmap` over many ablations.

    replace_attn, replace_mlp: [n_layers] the sublayer's write is replaced by the `Replacement`'s.
    replace_heads:             [n_layers, n_heads] the head's z (before W_O) is replaced.
    skip_attn, skip_mlp:       [n_layers] the sublayer is deleted: the stream leaves it as it came
                               in (for a post-LN model, its norm is skipped too).
    """

    replace_attn: jax.Array
    replace_mlp: jax.Array
    replace_heads: jax.Array
    skip_attn: jax.Array
    skip_mlp: jax.Array


@struct.dataclass
class Replacement:
    """Values written in place of the ablated ones; a size-1 batch or position axis broadcasts.

    attn_out, mlp_out: [n_layers, batch | 1, seq | 1, d_model]
    z:                 [n_layers, batch | 1, seq | 1, n_heads, d_head]
    """

    attn_out: jax.Array
    mlp_out: jax.Array
    z: jax.Array


class AblationError(ValueError):
    """A component, method or replacement that does not fit the model or the batch."""


# ------------------------------------------------------------------------------ components
def component_labels(cfg: ModelConfig, granularity: str) -> list[str]:
    """Every component of a granularity, in layer order: "layers" (`L{l}`), "sublayers"
    (`{l}_attn_out`, `{l}_mlp_out`) or "heads" (`L{l}H{h}`)."""
    layers = range(cfg.n_layers)
    if granularity == "layers":
        return [f"L{layer}" for layer in layers]
    if granularity == "sublayers":
        kinds = ("attn",) if cfg.attn_only else ("attn", "mlp")
        return [f"{layer}_{kind}_out" for layer in layers for kind in kinds]
    if granularity == "heads":
        return [f"L{layer}H{h}" for layer in layers for h in range(cfg.n_heads)]
    raise AblationError(f"granularity={granularity!r}: choose one of {list(GRANULARITIES)}")


def _valid_components(cfg: ModelConfig) -> str:
    last, heads = cfg.n_layers - 1, cfg.n_heads - 1
    forms = [f"L0..L{last} (whole layers)", f"0_attn_out..{last}_attn_out"]
    if not cfg.attn_only:
        forms.append(f"0_mlp_out..{last}_mlp_out")
    forms.append(f"L0H0..L{last}H{heads} (heads)")
    return ", ".join(forms)


def parse_component(cfg: ModelConfig, label: str) -> tuple[str, int, int | None]:
    """`label` -> (kind: "layer" | "attn" | "mlp" | "head", layer, head or None)."""
    if m := re.fullmatch(r"L(\d+)", label):
        kind, layer, head = "layer", int(m[1]), None
    elif m := re.fullmatch(r"(\d+)_(attn|mlp)_out", label):
        kind, layer, head = m[2], int(m[1]), None
    elif m := re.fullmatch(r"L(\d+)H(\d+)", label):
        kind, layer, head = "head", int(m[1]), int(m[2])
    else:
        raise AblationError(f"unknown component {label!r}: components are {_valid_components(cfg)}")
    cfg.check_layer(
        layer, what=f"{label!r}: layer", error=AblationError, hint=f" (components are {_valid_components(cfg)})"
    )
    if head is not None and head >= cfg.n_heads:
        raise AblationError(
            f"head {head} in {label!r} is out of range: each layer has heads 0..{cfg.n_heads - 1} "
            f"(L{layer}H0..L{layer}H{cfg.n_heads - 1})"
        )
    if kind == "mlp" and cfg.attn_only:
        raise AblationError(f"{label!r}: an attention-only model has no MLP (components are {_valid_components(cfg)})")
    return kind, layer, head


def no_ablation(cfg: ModelConfig) -> Ablation:
    """Masks that change nothing (numpy, so that they can be edited and stacked)."""
    layers = np.zeros(cfg.n_layers, bool)
    return Ablation(layers, layers.copy(), np.zeros((cfg.n_layers, cfg.n_heads), bool), layers.copy(), layers.copy())


def make_ablation(cfg: ModelConfig, components: Iterable[str], method: str = "zero") -> Ablation:
    """Masks removing every one of `components` with `method` (see the module docstring)."""
    _check_method(method)
    masks = jax.tree.map(np.copy, no_ablation(cfg))
    for label in components:
        kind, layer, head = parse_component(cfg, label)
        if method == "delete":
            if kind == "head":
                raise AblationError(
                    f"{label!r}: 'delete' removes layers or sublayers; ablate heads with zero, mean or resample"
                )
            if kind in ("layer", "attn"):
                masks.skip_attn[layer] = True
            if kind in ("layer", "mlp") and not cfg.attn_only:
                masks.skip_mlp[layer] = True
        elif kind == "head":
            masks.replace_heads[layer, head] = True
        else:
            if kind in ("layer", "attn"):
                masks.replace_attn[layer] = True
            if kind in ("layer", "mlp") and not cfg.attn_only:
                masks.replace_mlp[layer] = True
    return masks


def stack(ablations: Sequence[Ablation]) -> Ablation:
    """Ablations stacked on a new leading axis, for `jax.vmap` or a sweep."""
    return jax.tree.map(lambda *xs: np.stack(xs), *ablations)


def _check_method(method: str) -> None:
    if method not in METHODS:
        raise AblationError(f"method={method!r}: choose one of {list(METHODS)}")


# ------------------------------------------------------------------------------ replacements
def zero_replacement(cfg: ModelConfig) -> Replacement:
    """Zeros, broadcast over batch and positions."""
    d = (cfg.n_layers, 1, 1, cfg.d_model)
    return Replacement(
        jnp.zeros(d, jnp.float32), jnp.zeros(d, jnp.float32), jnp.zeros((*d[:3], cfg.n_heads, cfg.d_head))
    )


def _writes(model: Transformer, tokens: jax.Array) -> Replacement:
    _, cache = model.run_with_cache(tokens)
    mlp = cache.get("mlp_out", jnp.zeros_like(cache["attn_out"]))
    return Replacement(cache["attn_out"], mlp, cache["z"])


def mean_writes(model: Transformer, batches: Iterable[Any]) -> Replacement:
    """Per-position means over every sequence of `batches` (token arrays [batch, seq], all the same
    seq): the replacement for mean ablation over a dataset."""
    total, count = None, 0
    for tokens in batches:
        writes = jax.tree.map(lambda x: jnp.sum(x.astype(jnp.float32), axis=1, keepdims=True), _writes(model, tokens))
        if total is not None and writes.attn_out.shape != total.attn_out.shape:
            raise AblationError(
                f"mean over a dataset is taken per position: batches have seq lengths "
                f"{total.attn_out.shape[2]} and {writes.attn_out.shape[2]}; make every batch the same length"
            )
        total = writes if total is None else jax.tree.map(jnp.add, total, writes)
        count += np.shape(tokens)[0]
    if total is None:
        raise AblationError("mean_writes got no batches: pass at least one [batch, seq] array of token ids")
    return jax.tree.map(lambda x: x / count, total)


def replacement_for(model: Transformer, tokens: jax.Array, method: str, reference: Any = None) -> Replacement:
    """The values written by `method` when ablating `tokens` [batch, seq]:
    zero/delete: zeros; mean: per-position means over `reference` (default: `tokens` itself; or a
    `Replacement` from `mean_writes`); resample: the writes on `reference`, of the same shape."""
    _check_method(method)
    cfg = model.cfg
    if isinstance(reference, Replacement):
        return _checked_replacement(cfg, reference, np.shape(tokens))
    if method in ("zero", "delete"):
        return zero_replacement(cfg)
    if method == "mean":
        reference = tokens if reference is None else check_tokens(reference, cfg)
        if reference.shape[1] != tokens.shape[1]:
            raise AblationError(
                f"mean ablation replaces each position by its mean: the reference batch has seq length "
                f"{reference.shape[1]} but the ablated batch has {tokens.shape[1]}; use reference sequences "
                f"of length {tokens.shape[1]}"
            )
        return mean_writes(model, [reference])
    if reference is None:
        raise AblationError("resample ablation needs reference=tokens of another batch, shaped like the ablated batch")
    reference = check_tokens(reference, cfg)
    if reference.shape != tokens.shape:
        raise AblationError(
            f"resample ablation writes the reference batch's values sequence by sequence: the reference "
            f"tokens have shape {tuple(reference.shape)} but the ablated tokens {tuple(tokens.shape)}; "
            f"pass a reference of shape {tuple(tokens.shape)} (another batch, or this one shuffled)"
        )
    return _writes(model, reference)


def _checked_replacement(cfg: ModelConfig, values: Replacement, shape: tuple[int, ...]) -> Replacement:
    batch, seq = shape
    expect = {
        "attn_out": (cfg.n_layers, (1, batch), (1, seq), (cfg.d_model,)),
        "mlp_out": (cfg.n_layers, (1, batch), (1, seq), (cfg.d_model,)),
        "z": (cfg.n_layers, (1, batch), (1, seq), (cfg.n_heads, cfg.d_head)),
    }
    for name, (layers, batches, seqs, tail) in expect.items():
        got = tuple(getattr(values, name).shape)
        if (
            len(got) != 3 + len(tail)
            or got[0] != layers
            or got[1] not in batches
            or got[2] not in seqs
            or got[3:] != tail
        ):
            raise AblationError(
                f"replacement {name} has shape {got}; for this model and a batch of shape {shape} it must be "
                f"[{layers}, 1 or {batch}, 1 or {seq}, {', '.join(map(str, tail))}]"
            )
    return values
