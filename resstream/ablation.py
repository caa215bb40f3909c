"""Ablation studies: remove components and measure what the loss does, one at a time or all at once.

Components are named as in TransformerLens: `L{l}` (a whole layer: its attention and MLP writes),
`{l}_attn_out`, `{l}_mlp_out`, `L{l}H{h}` (one head: its z before W_O). Methods:
- "zero": the write (or the head's z) becomes zero;
- "mean": it becomes its mean over a reference batch or a dataset, per position;
- "resample": it becomes what the model wrote on another batch of the same shape, sequence by sequence;
- "delete": the sublayer or layer is removed: the stream leaves it as it came in (for a pre-LN
  residual model the same as "zero"; for a plain or post-LN network it also bypasses the layer's
  norms, which is what "removing a layer" means in the deletion experiments).

An ablation is data: an `Ablation` (boolean masks, [n_layers] and [n_layers, n_heads]) and a
`Replacement` (values), which the model's ordinary forward pass takes:

    >>> ablation = make_ablation(model.cfg, ["3_attn_out", "L1H2"], "zero")
    >>> logits = model(tokens, ablation=ablation, replacement=zero_replacement(model.cfg))

so `jax.vmap` over a stack of masks, `jax.jit` and sharding work as usual. `ablation_sweep` runs
every component of a granularity in one compiled call, sharing the unablated prefix of each
ablation (see `resstream.vectorised`), and reports next to each total effect the direct effect from
the exact decomposition. `deletion_curve` deletes k random layers, many draws per k.
"""

from __future__ import annotations

import functools
import itertools
import re
from collections.abc import Iterable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx, struct

from resstream import analysis
from resstream.config import ModelConfig
from resstream.model import Cache, Transformer, check_tokens
from resstream.sharding import mesh_context
from resstream.stream import Ablation, Replacement
from resstream.train import cross_entropy
from resstream.vectorised import Schedule, auto_chunk, make_schedule, run_lanes

METHODS = ("zero", "mean", "resample", "delete")
GRANULARITIES = ("layers", "sublayers", "heads")


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
    if layer >= cfg.n_layers:
        raise AblationError(
            f"layer {layer} in {label!r} is out of range: the model has layers 0..{cfg.n_layers - 1} "
            f"(components are {_valid_components(cfg)})"
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


# ------------------------------------------------------------------------------ one ablation
@struct.dataclass
class AblationResult:
    """loss: mean next-token loss (nats) of the ablated model; logits [batch, seq, vocab]."""

    loss: jax.Array
    logits: jax.Array


def _checked_tokens(model: Transformer, tokens: Any) -> jax.Array:
    tokens = check_tokens(tokens, model.cfg)
    if tokens.shape[1] < 2:
        raise AblationError(
            f"tokens have shape {tuple(tokens.shape)}: ablations are measured by the next-token loss, which needs "
            "sequences of at least 2 tokens"
        )
    return tokens


def next_token_loss(logits: jax.Array, tokens: jax.Array) -> jax.Array:
    """Mean loss of predicting tokens[:, 1:] from logits[:, :-1] (the training loss)."""
    return cross_entropy(logits[:, :-1], tokens[:, 1:])


@functools.partial(jax.jit, static_argnames=("graphdef",))
def _ablated(
    graphdef: Any, state: Any, tokens: jax.Array, ablation: Ablation, replacement: Replacement
) -> AblationResult:
    logits, _ = nnx.merge(graphdef, state)._trace(
        tokens, mode="off", record=(), rng=None, ablation=ablation, replacement=replacement
    )
    return AblationResult(next_token_loss(logits, tokens), logits)


def ablate(
    model: Transformer,
    tokens: Any,
    components: Iterable[str] | Ablation,
    *,
    method: str = "zero",
    reference: Any = None,
) -> AblationResult:
    """Remove `components` (labels, or an `Ablation`) with `method` and return the loss and logits.

    `reference`: for "mean", the tokens the means are taken over (default: `tokens`) or a
    `Replacement` from `mean_writes`; for "resample", a batch of tokens shaped like `tokens`."""
    tokens = _checked_tokens(model, tokens)
    ablation = components if isinstance(components, Ablation) else make_ablation(model.cfg, components, method)
    replacement = replacement_for(model, tokens, method, reference)
    graphdef, state = nnx.split(model)
    with mesh_context(state):
        return _ablated(graphdef, state, tokens, ablation, replacement)


# ------------------------------------------------------------------------------ sweeps
@struct.dataclass
class SweepTable:
    """One row per component. loss [n]: the loss with it ablated; `total` = loss - baseline;
    direct [n]: the loss change when only the component's direct path to the logits is ablated
    (its row of the exact decomposition replaced by the replacement's, every norm scale frozen),
    so total - direct is what it does through later layers. None when the sweep skipped it."""

    labels: tuple[str, ...] = struct.field(pytree_node=False)
    method: str = struct.field(pytree_node=False)
    baseline: jax.Array
    loss: jax.Array
    direct: jax.Array | None

    @property
    def total(self) -> jax.Array:
        return self.loss - self.baseline

    def rows(self) -> list[dict[str, Any]]:
        total, loss = np.asarray(self.total, np.float64), np.asarray(self.loss, np.float64)
        direct = np.full_like(total, np.nan) if self.direct is None else np.asarray(self.direct, np.float64)
        return [
            {
                "component": label,
                "loss": float(loss[i]),
                "total_effect": float(total[i]),
                "direct_effect": float(direct[i]),
                "indirect_effect": float(total[i] - direct[i]),
            }
            for i, label in enumerate(self.labels)
        ]

    def __str__(self) -> str:
        lines = [
            f"{self.method} ablation, baseline loss {float(self.baseline):.4f} nats",
            f"{'component':>12} {'loss':>9} {'total':>9} {'direct':>9} {'indirect':>9}",
        ]
        for r in self.rows():
            lines.append(
                f"{r['component']:>12} {r['loss']:9.4f} {r['total_effect']:+9.4f} "
                f"{r['direct_effect']:+9.4f} {r['indirect_effect']:+9.4f}"
            )
        return "\n".join(lines)


def _direct_rows(model: Transformer, label: str) -> list[str]:
    """The decomposition rows that make up a component's direct path to the logits."""
    kind, layer, _ = parse_component(model.cfg, label)
    if kind == "layer":
        return [f"{layer}_attn_out"] + ([] if model.cfg.attn_only else [f"{layer}_mlp_out"])
    return [label]


def _difference_cache(cache: Cache, replacement: Replacement) -> Cache:
    """The cache with every write and every z replaced by (replacement - actual), norm scales kept.
    Each row of the decomposition is linear in its own write (the scales are frozen), so the rows
    of this cache are exactly the change of each component's direct contribution."""
    out = dict(cache)
    for name in ("attn_out", "mlp_out", "z"):
        if name in cache:
            out[name] = (getattr(replacement, name) - cache[name].astype(jnp.float32)).astype(jnp.float32)
    return out


def _direct_losses(
    model: Transformer,
    cache: Cache,
    logits: jax.Array,
    tokens: jax.Array,
    replacement: Replacement,
    labels: Sequence[str],
    chunk: int,
) -> jax.Array:
    """Loss [n] with each component's direct contribution to the logits swapped for its replacement's."""
    difference = _difference_cache(cache, replacement)
    is_head = [parse_component(model.cfg, label)[0] == "head" for label in labels]
    deltas, columns = [], {}
    for split in sorted(set(is_head)):
        rows = analysis.decompose_logits(model, difference, split_heads=split)
        wanted = {r for label, h in zip(labels, is_head, strict=True) if h == split for r in _direct_rows(model, label)}
        wanted = [r for r in rows.labels if r in wanted]  # a plain network has no direct path from early writes
        columns.update({(split, r): len(columns) + i for i, r in enumerate(wanted)})
        deltas.append(rows.values[np.array([rows.labels.index(r) for r in wanted], int)])
    delta = jnp.concatenate(deltas)  # [n_rows, batch, seq, vocab]
    weights = np.zeros((len(labels), delta.shape[0]), np.float32)  # job -> the rows it swaps
    for i, (label, split) in enumerate(zip(labels, is_head, strict=True)):
        for r in _direct_rows(model, label):
            if (split, r) in columns:
                weights[i, columns[(split, r)]] = 1.0

    def one(w: jax.Array) -> jax.Array:
        return next_token_loss(logits + jnp.tensordot(w, delta, axes=1), tokens)

    return jax.lax.map(one, jnp.asarray(weights), batch_size=chunk)


@functools.partial(jax.jit, static_argnames=("graphdef", "schedule", "labels", "chunk", "direct"))
def _sweep(
    graphdef, state, tokens, ablation, replacement, *, schedule: Schedule, labels: tuple, chunk: int, direct: bool
):
    model = nnx.merge(graphdef, state)
    logits, cache = model._trace(tokens, mode="full", record=("resid_pre", "resid_mid"), rng=None)
    baseline = next_token_loss(logits, tokens)
    losses = run_lanes(
        model, cache, ablation, replacement, schedule, lambda lg: next_token_loss(lg, tokens), chunk_size=chunk
    )
    if not direct:
        return baseline, losses, None
    return baseline, losses, _direct_losses(model, cache, logits, tokens, replacement, labels, chunk) - baseline


def ablation_sweep(
    model: Transformer,
    tokens: Any,
    granularity: str = "sublayers",
    *,
    components: Sequence[str] | None = None,
    method: str = "zero",
    reference: Any = None,
    direct: bool = True,
    chunk_size: int | None = None,
) -> SweepTable:
    """Ablate every component of `granularity` ("layers", "sublayers", "heads"), or each of
    `components`, one at a time, in one compiled call; returns a `SweepTable` of loss deltas with
    the direct effect of each component alongside (`direct=False` skips it: one unembedding per
    component less). `chunk_size`: ablations evaluated at once (default: `auto_chunk`)."""
    cfg = model.cfg
    tokens = _checked_tokens(model, tokens)
    labels = tuple(components) if components is not None else tuple(component_labels(cfg, granularity))
    if not labels:
        raise AblationError("nothing to sweep: give at least one component")
    ablation = stack([make_ablation(cfg, [label], method) for label in labels])
    replacement = replacement_for(model, tokens, method, reference)
    chunk = chunk_size or auto_chunk(model, *tokens.shape, len(labels))
    graphdef, state = nnx.split(model)
    with mesh_context(state):
        baseline, losses, direct = _sweep(
            graphdef,
            state,
            tokens,
            ablation,
            replacement,
            schedule=make_schedule(model, ablation),
            labels=labels,
            chunk=chunk,
            direct=direct,
        )
    return SweepTable(labels, method, baseline, losses, direct)


# ------------------------------------------------------------------------------ deletion curves
@struct.dataclass
class DeletionCurve:
    """deleted: per draw, the layers removed; loss [n_draws]: the loss of each draw; baseline: the
    loss with nothing deleted. `k`, `ks` and `by_k()` group the draws by how many layers they removed."""

    deleted: tuple[tuple[int, ...], ...] = struct.field(pytree_node=False)
    loss: jax.Array
    baseline: jax.Array

    @property
    def k(self) -> np.ndarray:
        return np.array([len(d) for d in self.deleted])

    @property
    def ks(self) -> np.ndarray:
        return np.unique(self.k)

    def by_k(self) -> dict[int, np.ndarray]:
        """k -> the losses of every draw that deleted k layers."""
        loss = np.asarray(self.loss)
        return {int(k): loss[self.k == k] for k in self.ks}

    def rows(self) -> list[dict[str, Any]]:
        return [
            {"k": len(d), "deleted": " ".join(map(str, d)), "loss": float(x), "delta": float(x - self.baseline)}
            for d, x in zip(self.deleted, np.asarray(self.loss), strict=True)
        ]

    def __str__(self) -> str:
        lines = [
            f"layer deletion, baseline loss {float(self.baseline):.4f} nats",
            f"{'k':>3} {'draws':>5} {'mean loss':>10} {'min':>8} {'max':>8}",
        ]
        for k, losses in self.by_k().items():
            lines.append(f"{k:>3} {len(losses):>5} {losses.mean():10.4f} {losses.min():8.4f} {losses.max():8.4f}")
        return "\n".join(lines)


def deletion_subsets(n_layers: int, ks: Iterable[int], draws: int, seed: int = 0) -> list[tuple[int, ...]]:
    """For each k, `draws` distinct random sets of k layers (all of them when there are fewer)."""
    rng = np.random.default_rng(seed)
    out = []
    for k in ks:
        if not 0 <= k <= n_layers:
            raise AblationError(f"cannot delete {k} layers: the model has {n_layers}")
        every = list(itertools.combinations(range(n_layers), k))
        if len(every) <= draws:
            out += every
        else:
            picks = rng.choice(len(every), size=draws, replace=False)
            out += [every[i] for i in sorted(picks)]
    return out


def deletion_curve(
    model: Transformer,
    tokens: Any,
    *,
    ks: Iterable[int] | None = None,
    draws: int = 16,
    seed: int = 0,
    chunk_size: int | None = None,
) -> DeletionCurve:
    """Delete k randomly chosen layers (`draws` draws per k; default k = 0..n_layers) and record the
    loss of each draw: the experiment behind "residual networks survive the removal of layers"."""
    cfg = model.cfg
    tokens = _checked_tokens(model, tokens)
    subsets = deletion_subsets(cfg.n_layers, range(cfg.n_layers + 1) if ks is None else ks, draws, seed)
    if not subsets:
        raise AblationError(f"no deletions to run: give ks between 0 and {cfg.n_layers} and draws >= 1")
    ablation = stack([make_ablation(cfg, [f"L{layer}" for layer in s], "delete") for s in subsets])
    chunk = chunk_size or auto_chunk(model, *tokens.shape, len(subsets))
    graphdef, state = nnx.split(model)
    with mesh_context(state):
        baseline, losses, _ = _sweep(
            graphdef, state, tokens, ablation, zero_replacement(cfg),
            schedule=make_schedule(model, ablation), labels=(), chunk=chunk, direct=False,
        )  # fmt: skip
    return DeletionCurve(tuple(subsets), losses, baseline)
