"""Many interventions on one batch, run as one vectorised computation that shares their prefixes.

An intervention whose first change is at sublayer k leaves everything before k as it was, so its
stream entering k is the base run's. A study of many interventions therefore need not run each one
as a full forward pass. Run the base once, recording the stream entering every sublayer. Then go
through the sublayers once, carrying one stream ("lane") for each intervention that has started;
an intervention joins at its first changed sublayer, from the base stream there. The work is
sum_j (n_sublayers - start_j) sublayers instead of n_jobs * n_sublayers: about half, for sweeps
that change one component at a time. An intervention whose first change replaces or deletes a whole
write does not compute that sublayer at all, since its output is known.

Memory is bounded in two ways (see `LanePlan`). Lanes are evaluated `chunk` at a time within a
sublayer (vmapped, or mapped in chunks with `jax.lax.map`), which bounds the temporaries. And the
jobs are split into groups of at most `lanes` lanes that run one after another (`jax.lax.map` over
groups), which bounds the streams carried: every group has the same structure (how many of its
lanes join at each sublayer), so one compiled body serves them all; a group short of a job of some
structure repeats one, and the repeat's result is dropped.

The lanes grow from one sublayer to the next, which a scan cannot express: shallow models unroll
their sublayers. Deeper ones (over UNROLLED_LAYERS layers) would compile a body per sublayer, so
their jobs run in cohorts instead (`lane_plan.make_cohorts`): every cohort has as many lanes, starts
from the base stream entering its earliest job's first changed layer (the layers before a job's
first change leave it as it was) and runs to the last layer in one `fori_loop` with a dynamic start.
One layer body serves every cohort, so compile time stays flat in depth for a little more work.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from resstream.interventions import Ablation, Replacement
from resstream.lane_plan import Cohorts, LanePlan, Schedule, make_cohorts, make_groups
from resstream.model import Cache, Transformer
from resstream.stream import ResidualStream


def _map_lanes(fn: Callable, xs: Any, chunk: int) -> Any:
    n = jax.tree.leaves(xs)[0].shape[0]
    if n <= chunk:
        return jax.vmap(fn)(*xs)
    return jax.lax.map(lambda a: fn(*a), xs, batch_size=chunk)


def _lane_stream(cfg: Any, resid: jax.Array, ablation: Ablation, values: Replacement) -> ResidualStream:
    """One lane's stream [batch, seq, d_model] as the model carries it, under the lane's ablation."""
    return ResidualStream(resid, {}, ablation, values, residual=cfg.residual, carry_scale=cfg.residual_scale)


def _stream_entering(cache: Cache, cfg: Any, k: int) -> jax.Array:
    """The base run's stream [batch, seq, d_model] entering sublayer k (k = n_sublayers: final)."""
    if k == cfg.n_sublayers:
        return cache["resid_final"]
    layer, kind = cfg.sublayer(k)
    return cache["resid_pre" if kind == "attn" else "resid_mid"][layer]


@dataclasses.dataclass
class _Lanes:
    """The state of `run_lanes`: the lanes that have started, in the order of `jobs`, and their
    streams [len(jobs), batch, seq, d_model] entering the next sublayer. Once `window` is set, only
    those positions are carried (the readout reads no others)."""

    model: Transformer
    base: Cache
    ablation: Ablation
    replacement: Replacement
    schedule: Schedule
    source: Cache | None
    patch_positions: jax.Array | None
    chunk_size: int
    read_last: int | None = None
    jobs: list[int] = dataclasses.field(default_factory=list)
    streams: jax.Array | None = None
    window: slice | None = None
    # parallel blocks: each lane's stream entering the current layer, which its MLP reads
    layer_input: jax.Array | None = None

    def narrow(self) -> None:
        """From here on carry only the last `read_last` positions."""
        self.window = slice(-self.read_last, None)
        if self.streams is not None:
            self.streams = self.streams[:, :, self.window]
        if self.layer_input is not None:
            self.layer_input = self.layer_input[:, :, self.window]

    def entering(self, jobs: list[int], k: int) -> jax.Array:
        """Initial streams [len(jobs), batch, seq, d_model] of jobs that join at sublayer k: the
        base run's, with the source run's copied in where a job patches the stream entering k."""
        cfg = self.model.cfg
        shape = self.base["embed"].shape
        x = jnp.broadcast_to(_stream_entering(self.base, cfg, k), (len(jobs), *shape))
        patched = np.array([self.schedule.patch_layers[j] * cfg.sublayers_per_layer == k for j in jobs])
        if self.source is not None and patched.any():
            where = self.patch_positions[np.array(jobs)] & jnp.asarray(patched)[:, None]  # [jobs, seq]
            x = jnp.where(where[:, None, :, None], _stream_entering(self.source, cfg, k)[None], x)
        return x if self.window is None else x[:, :, self.window]

    def apply(
        self, k: int, jobs: list[int], streams: jax.Array, compute: bool, reads: jax.Array | None = None
    ) -> jax.Array:
        """Sublayer k applied to each lane under that lane's ablation; `compute=False` for lanes
        whose write there is replaced or deleted whole (its output is known); `reads` [lanes, batch,
        seq, d_model]: what each lane's sublayer reads instead of its stream (a parallel block's MLP)."""
        cfg = self.model.cfg
        layer, kind = cfg.sublayer(k)
        block = self.model.layer(layer)
        rope = self.model.rope(streams.shape[2])
        lane_masks = jax.tree.map(lambda m: m[np.array(jobs), layer], self.ablation)
        values = jax.tree.map(lambda v: v[layer], self.replacement)  # [batch | 1, seq | 1, ...]
        if self.window is not None:
            values = jax.tree.map(lambda v: v if v.shape[1] == 1 else v[:, self.window], values)

        def one(resid: jax.Array, lane_ablation: Ablation, lane_reads: jax.Array | None) -> jax.Array:
            stream = _lane_stream(cfg, resid, lane_ablation, values)
            return block.sublayer(kind, stream, rope, compute=compute, reads=lane_reads).resid

        return _map_lanes(one, (streams, lane_masks, reads), self.chunk_size)

    def step(self, k: int) -> None:
        """Let the jobs that start at k join, then run sublayer k on every lane. The last sublayer,
        if an MLP (position by position), runs only at the positions read."""
        last_mlp = k == self.model.cfg.n_sublayers - 1 and self.model.cfg.sublayer(k)[1] == "mlp"
        if self.read_last is not None and last_mlp:
            self.narrow()
        new = [j for j in range(self.schedule.n_jobs) if self.schedule.starts[j] == k]
        fresh = [j for j in new if not self.schedule.cheap[j]]  # compute sublayer k from the base stream
        known = [j for j in new if self.schedule.cheap[j]]  # sublayer k's output is known
        computed, parts, inputs = self.jobs + fresh, [], []
        parallel_mlp = self.model.cfg.parallel_attn and self.model.cfg.sublayer(k)[1] == "mlp"
        reads = self.layer_input if parallel_mlp else None  # no job starts at a parallel MLP
        if computed:
            ongoing = [] if self.streams is None else [self.streams]
            x = jnp.concatenate([*ongoing, self.entering(fresh, k)]) if fresh else self.streams
            parts.append(self.apply(k, computed, x, compute=True, reads=reads))
            inputs.append(x)
        if known:
            x = self.entering(known, k)
            parts.append(self.apply(k, known, x, compute=False))
            inputs.append(x)
        if self.model.cfg.parallel_attn and not parallel_mlp and inputs:
            self.layer_input = jnp.concatenate(inputs) if len(inputs) > 1 else inputs[0]
        if parts:
            self.streams = jnp.concatenate(parts) if len(parts) > 1 else parts[0]
            self.jobs = computed + known

    def finish(self) -> None:
        """Jobs that change nothing join at the end, as the base run's final stream."""
        n = self.model.cfg.n_sublayers
        untouched = [j for j in range(self.schedule.n_jobs) if self.schedule.starts[j] == n]
        if self.read_last is not None and self.window is None:
            self.narrow()
        if untouched:
            x = self.entering(untouched, n)
            self.streams = x if self.streams is None else jnp.concatenate([self.streams, x])
            self.jobs = self.jobs + untouched


def _run_cohorts(
    model: Transformer,
    base: Cache,
    ablation: Ablation,
    replacement: Replacement,
    schedule: Schedule,
    cohorts: Cohorts,
    readout: Callable[[jax.Array], Any],
    patch: tuple[Cache, jax.Array] | None,
    chunk: int,
    read_last: int | None,
) -> Any:
    """`run_lanes` for a deep model: each cohort from its start layer to the last in one loop, a
    patching job's source stream copied in as it enters its patched layer."""
    cfg = model.cfg
    graphdef, weights = nnx.split(model.blocks)  # every leaf [n_layers, ...]
    resid_pre, resid_final = base["resid_pre"], base["resid_final"]  # [n_layers, batch, seq, d_model], [batch, ...]
    rope = model.rope(resid_final.shape[1])
    members = cohorts.members
    masks = jax.tree.map(lambda m: m[members], ablation)  # [n_cohorts, n_slots, n_layers, ...]
    if patch is None:
        patch_layers = positions = None
    else:
        patch_layers = jnp.asarray(np.array(schedule.patch_layers)[members])  # [n_cohorts, n_slots]; -1: none
        positions = patch[1][members]  # [n_cohorts, n_slots, seq]

    def at(x: Any, index: jax.Array, axis: int = 0) -> Any:
        return jax.tree.map(lambda a: jax.lax.dynamic_index_in_dim(a, index, axis, keepdims=False), x)

    def layer(index: jax.Array, streams: jax.Array, xs: tuple) -> jax.Array:
        cohort_masks, cohort_patch_layers, cohort_positions = xs
        if patch is not None:
            here = (cohort_patch_layers == index)[:, None] & cohort_positions  # [n_slots, seq]
            streams = jnp.where(here[:, None, :, None], at(patch[0]["resid_pre"], index)[None], streams)
        block, values = nnx.merge(graphdef, at(weights, index)), at(replacement, index)

        def one(resid: jax.Array, lane_ablation: Ablation) -> jax.Array:
            return block(_lane_stream(cfg, resid, lane_ablation, values), rope).resid

        return _map_lanes(one, (streams, at(cohort_masks, index, axis=1)), chunk)

    def cohort(xs: tuple) -> Any:
        start, rest = xs[0], xs[1:]
        entering = jnp.where(start < cfg.n_layers, resid_pre[jnp.minimum(start, cfg.n_layers - 1)], resid_final)
        streams = jnp.broadcast_to(entering, (members.shape[1], *resid_final.shape))
        streams = jax.lax.fori_loop(start, cfg.n_layers, lambda i, x: layer(i, x, rest), streams)
        if read_last is not None:
            streams = streams[:, :, -read_last:]
        return _map_lanes(readout, (streams,), chunk)

    # [n_cohorts, n_slots, ...]
    out = jax.lax.map(cohort, (jnp.asarray(cohorts.starts), masks, patch_layers, positions))
    return jax.tree.map(lambda x: x.reshape(-1, *x.shape[2:])[cohorts.where], out)


def run_lanes(
    model: Transformer,
    base: Cache,
    ablation: Ablation,
    replacement: Replacement,
    schedule: Schedule,
    readout: Callable[[jax.Array], Any],
    *,
    source: Cache | None = None,
    patch_positions: jax.Array | None = None,
    plan: LanePlan,
    read_last: int | None = None,
) -> Any:
    """Run every job of `schedule` and return `readout(final stream [batch, seq, d_model])` for
    each, stacked on a leading [n_jobs] axis in job order. Traced: call it inside a jit.
    With `read_last=n` the readout gets only the last n positions, [batch, n, d_model], and a final
    MLP sublayer is computed only there.

    base:   the cache of the unablated run, with "resid_pre" and "resid_mid" recorded.
    ablation: masks with a leading [n_jobs] axis; replacement: values shared by all jobs.
    source, patch_positions [n_jobs, seq]: for patching, the run whose stream is copied in at each
    job's patched layer, at the positions marked True.
    plan: how many lanes are carried (per group) and evaluated at once.
    """
    cohorts = make_cohorts(model, schedule, plan)
    if cohorts is not None:
        patch = None if source is None else (source, patch_positions)
        return _run_cohorts(
            model, base, ablation, replacement, schedule, cohorts, readout, patch, plan.chunk, read_last
        )
    groups = make_groups(schedule, plan.lanes)
    ablation = jax.tree.map(lambda m: m[groups.members], ablation)  # [n_groups, n_slots, ...]
    positions = None if patch_positions is None else patch_positions[groups.members]

    def group(xs: tuple[Ablation, jax.Array | None]) -> Any:
        lanes = _Lanes(model, base, xs[0], replacement, groups.slots, source, xs[1], plan.chunk, read_last)
        for k in range(model.cfg.n_sublayers):
            lanes.step(k)
        lanes.finish()
        out = _map_lanes(readout, (lanes.streams,), plan.chunk)
        slot = np.argsort(np.array(lanes.jobs))  # lane order -> slot order
        return jax.tree.map(lambda x: x[slot], out)

    if len(groups.members) == 1:
        out = jax.tree.map(lambda x: x[None], group(jax.tree.map(lambda x: x[0], (ablation, positions))))
    else:
        out = jax.lax.map(group, (ablation, positions))
    return jax.tree.map(lambda x: x.reshape(-1, *x.shape[2:])[groups.where], out)
