"""Ablation experiments: remove components and measure what the loss does, one at a time or all
at once. The components, methods and replacement values are `resstream.interventions`.

    >>> ablate(model, tokens, ["3_attn_out", "L1H2"], method="mean").loss
    >>> print(ablation_sweep(model, tokens, "heads"))     # every head, one compiled call
    >>> deletion_curve(model, tokens, draws=16).by_k()    # k random layers deleted, for every k

`ablation_sweep` shares the unablated prefix of each ablation (see `resstream.vectorised`) and
reports next to each total effect the direct effect from the exact decomposition.
"""

from __future__ import annotations

import functools
import itertools
from collections.abc import Iterable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx, struct

from resstream import analysis
from resstream.interventions import (
    Ablation,
    AblationError,
    Replacement,
    component_labels,
    make_ablation,
    parse_component,
    replacement_for,
    stack,
    zero_replacement,
)
from resstream.losses import next_token_loss
from resstream.model import Cache, Transformer, check_tokens
from resstream.sharding import mesh_context
from resstream.vectorised import Schedule, auto_chunk, make_schedule, run_lanes


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
    logits = model(tokens, ablation=ablation, replacement=replacement)
    return AblationResult(_loss(logits, tokens), logits)


_loss = jax.jit(next_token_loss)


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
        """Loss change [n] with each component ablated: loss - baseline."""
        return self.loss - self.baseline

    def rows(self) -> list[dict[str, Any]]:
        """One dict per row, for CSV and JSON."""
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
    logits, cache = model.forward(tokens, record=("resid_pre", "resid_mid"))
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
        """Layers deleted by each draw [n_draws]."""
        return np.array([len(d) for d in self.deleted])

    @property
    def ks(self) -> np.ndarray:
        """The distinct numbers of layers deleted, ascending."""
        return np.unique(self.k)

    def by_k(self) -> dict[int, np.ndarray]:
        """k -> the losses of every draw that deleted k layers."""
        loss = np.asarray(self.loss)
        return {int(k): loss[self.k == k] for k in self.ks}

    def rows(self) -> list[dict[str, Any]]:
        """One dict per draw (k, the layers deleted, loss, loss - baseline), for CSV and JSON."""
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
