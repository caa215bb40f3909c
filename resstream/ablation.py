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
import math
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx, struct

from resstream import analysis
from resstream.cache_view import CacheView
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
from resstream.lane_plan import LanePlan, Schedule, make_schedule, plan_lanes
from resstream.losses import next_token_loss
from resstream.matmul import matmul, matmul_precision
from resstream.memory import plan_budget, run_within
from resstream.model import Cache, Transformer, check_tokens
from resstream.sharding import mesh_context
from resstream.vectorised import run_lanes


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
    """Loss [n] with each component's direct contribution to the logits swapped for its replacement's.

    A component's direct change of the final stream (every norm scale frozen) is the sum of its rows
    in the decomposition of the difference cache; each job's change goes through the frozen final
    norm and W_U `chunk` jobs at a time, so no [n, batch, seq, vocab] array is made."""
    difference = _difference_cache(cache, replacement)
    is_head = [parse_component(model.cfg, label)[0] == "head" for label in labels]
    blocks, columns = [], {}
    for split in sorted(set(is_head)):
        rows = analysis.decompose_resid(model, difference, split_heads=split)  # [n_rows, batch, seq, d_model]
        wanted = {r for label, h in zip(labels, is_head, strict=True) if h == split for r in _direct_rows(model, label)}
        wanted = [r for r in rows.labels if r in wanted]  # a plain network has no direct path from early writes
        columns.update({(split, r): len(columns) + i for i, r in enumerate(wanted)})
        blocks.append(rows.values[np.array([rows.labels.index(r) for r in wanted], int)])
    changes = jnp.concatenate(blocks)  # [n_wanted, batch, seq, d_model]
    weights = np.zeros((len(labels), changes.shape[0]), np.float32)  # job -> the rows it swaps
    for i, (label, split) in enumerate(zip(labels, is_head, strict=True)):
        for r in _direct_rows(model, label):
            if (split, r) in columns:
                weights[i, columns[(split, r)]] = 1.0

    W_eff, row_scale, _ = analysis.frozen_readout(model, CacheView(cache))  # once, outside the loop

    def one(w: jax.Array) -> jax.Array:
        change = jnp.tensordot(w, changes, axes=1, precision=matmul_precision(w, changes))  # [batch, seq, d_model]
        direct = matmul(change, W_eff)  # what the change adds to the logits through the frozen final norm
        return next_token_loss(logits + (direct if row_scale is None else direct * row_scale), tokens)

    return jax.lax.map(one, jnp.asarray(weights), batch_size=chunk)


def _lane_loss(model: Transformer, tokens: jax.Array) -> Callable[[jax.Array], jax.Array]:
    return lambda resid: next_token_loss(model.unembed(resid)[0], tokens)


@functools.partial(jax.jit, static_argnames=("graphdef", "schedule", "labels", "plan", "direct"))
def _sweep(
    state, tokens, ablation, replacement, *, graphdef, schedule: Schedule, labels: tuple, plan: LanePlan, direct: bool
):
    model = nnx.merge(graphdef, state)
    logits, cache = model.forward(tokens, record=("resid_pre", "resid_mid"))
    baseline = next_token_loss(logits, tokens)
    losses = run_lanes(model, cache, ablation, replacement, schedule, _lane_loss(model, tokens), plan=plan)
    if not direct:
        return baseline, losses, None
    return baseline, losses, _direct_losses(model, cache, logits, tokens, replacement, labels, plan.chunk) - baseline


def _run_sweep(
    model: Transformer,
    tokens: jax.Array,
    ablation: Ablation,
    replacement: Replacement,
    *,
    labels: tuple,
    direct: bool,
    what: str,
    chunk_size: int | None,
    group_size: int | None,
    memory_budget: int | None,
) -> tuple[jax.Array, jax.Array, jax.Array | None]:
    """(baseline, losses [n_jobs], direct effects [n_jobs] or None), within the memory budget."""
    schedule = make_schedule(model, ablation)
    budget = plan_budget(memory_budget, (model, tokens))
    plan = plan_lanes(model, *tokens.shape, schedule, budget, chunk_size=chunk_size, group_size=group_size)
    graphdef, state = nnx.split(model)
    static = {"graphdef": graphdef, "schedule": schedule, "labels": labels, "plan": plan, "direct": direct}
    hint = f": use fewer or shorter sequences than {tuple(tokens.shape)}"
    with mesh_context(state):
        return run_within(
            _sweep, (state, tokens, ablation, replacement), static, budget=memory_budget, what=what, hint=hint,
            smaller=LanePlan.smaller,
        )  # fmt: skip


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
    group_size: int | None = None,
    memory_budget: int | None = None,
) -> SweepTable:
    """Ablate every component of `granularity` ("layers", "sublayers", "heads"), or each of
    `components`, one at a time, in one compiled call; returns a `SweepTable` of loss deltas with
    the direct effect of each component alongside (`direct=False` skips it: one unembedding per
    component less).

    The whole call stays within `memory_budget` bytes (default: most of the device's memory; see
    `resstream.memory`). `chunk_size` (ablations evaluated at once) and `group_size` (ablations
    carried at once) override the plan the budget would choose."""
    cfg = model.cfg
    tokens = _checked_tokens(model, tokens)
    labels = tuple(components) if components is not None else tuple(component_labels(cfg, granularity))
    if not labels:
        raise AblationError("nothing to sweep: give at least one component")
    ablation = stack([make_ablation(cfg, [label], method) for label in labels])
    replacement = replacement_for(model, tokens, method, reference)
    baseline, losses, direct = _run_sweep(
        model, tokens, ablation, replacement, labels=labels, direct=direct, what=f"a sweep of {len(labels)} ablations",
        chunk_size=chunk_size, group_size=group_size, memory_budget=memory_budget,
    )  # fmt: skip
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
    """For each k, `draws` distinct random sets of k layers (all of them when there are no more
    than `draws`). Sets are drawn one at a time, never enumerated: C(32, 16) is 6e8."""
    rng = np.random.default_rng(seed)
    out = []
    for k in ks:
        if not 0 <= k <= n_layers:
            raise AblationError(f"cannot delete {k} layers: the model has {n_layers}")
        if math.comb(n_layers, k) <= draws:
            out += list(itertools.combinations(range(n_layers), k))
            continue
        drawn: set[tuple[int, ...]] = set()
        while len(drawn) < draws:  # more than `draws` sets exist, so this ends
            drawn.add(tuple(sorted(int(i) for i in rng.choice(n_layers, size=k, replace=False))))
        out += sorted(drawn)
    return out


def _given_subsets(cfg: Any, subsets: Iterable[Iterable[int]], ks: Any) -> list[tuple[int, ...]]:
    """`deletion_curve`'s `subsets` as sorted tuples of distinct layer indices, or AblationError."""
    if ks is not None:
        raise AblationError("give ks (random draws of k layers) or subsets (the sets to delete), not both")
    try:
        given = [tuple(sorted({cfg.check_layer(i, error=AblationError) for i in s})) for s in subsets]
    except TypeError as err:
        raise AblationError(f"subsets must be sets of layer indices, e.g. [(0, 1), (2,)], got {subsets!r}") from err
    if not given:
        raise AblationError("subsets is empty: give at least one set of layers to delete")
    return given


def deletion_curve(
    model: Transformer,
    tokens: Any,
    *,
    ks: Iterable[int] | None = None,
    draws: int = 16,
    seed: int = 0,
    subsets: Iterable[Iterable[int]] | None = None,
    chunk_size: int | None = None,
    group_size: int | None = None,
    memory_budget: int | None = None,
) -> DeletionCurve:
    """Delete k randomly chosen layers (`draws` draws per k; default k = 0..n_layers) and record the
    loss of each draw: the experiment behind "residual networks survive the removal of layers".
    `subsets`: the sets of layers to delete instead of random draws (e.g. every contiguous block),
    all in the same one compiled call (`ks`, `draws` and `seed` are then not used). `memory_budget`,
    `chunk_size`, `group_size`: as for `ablation_sweep`."""
    cfg = model.cfg
    tokens = _checked_tokens(model, tokens)
    if subsets is None:
        subsets = deletion_subsets(cfg.n_layers, range(cfg.n_layers + 1) if ks is None else ks, draws, seed)
    else:
        subsets = _given_subsets(cfg, subsets, ks)
    if not subsets:
        raise AblationError(f"no deletions to run: give ks between 0 and {cfg.n_layers} and draws >= 1")
    ablation = stack([make_ablation(cfg, [f"L{layer}" for layer in s], "delete") for s in subsets])
    baseline, losses, _ = _run_sweep(
        model, tokens, ablation, zero_replacement(cfg), labels=(), direct=False,
        what=f"a deletion curve of {len(subsets)} draws", chunk_size=chunk_size, group_size=group_size,
        memory_budget=memory_budget,
    )  # fmt: skip
    return DeletionCurve(tuple(subsets), losses, baseline)
