"""Many interventions on one batch, run as one vectorised computation that shares their prefixes.

An intervention whose first change is at sublayer k leaves everything before k as it was, so its
stream entering k is the base run's. A study of many interventions therefore need not run each one
as a full forward pass. Run the base once, recording the stream entering every sublayer. Then go
through the sublayers once, carrying one stream ("lane") for each intervention that has started;
an intervention joins at its first changed sublayer, from the base stream there. The work is
sum_j (n_sublayers - start_j) sublayers instead of n_jobs * n_sublayers: about half, for sweeps
that change one component at a time. An intervention whose first change replaces or deletes a whole
write does not compute that sublayer at all, since its output is known.

Lanes are vmapped (or, to bound memory, mapped in chunks of `chunk_size` with `jax.lax.map`). The
sublayers are unrolled, because the number of lanes grows from one sublayer to the next and a scan
cannot express that; so, unlike the model's forward pass, compile time here grows with depth.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from resstream.interventions import Ablation, Replacement
from resstream.model import Cache, Transformer
from resstream.stream import ResidualStream

# Bytes of transient activations that the lanes of one chunk may take. On CPU a chunk's attention
# scores must stay near the caches (narrow chunks ran faster there; benchmarks/ablation.py);
# accelerators want wide chunks.
MEMORY_BUDGET = {"cpu": 64 << 20}
DEFAULT_MEMORY_BUDGET = 1 << 30


@dataclasses.dataclass(frozen=True)
class Schedule:
    """Static plan (hashable, so it keys the compile cache).

    starts:        per job, the first sublayer it changes (n_sublayers: it changes nothing).
    cheap:         per job, whether that first change replaces or deletes the whole write, so the
                   sublayer need not be computed for it.
    patch_layers:  per job, the layer whose input stream is patched from the source run, or -1.
    """

    starts: tuple[int, ...]
    cheap: tuple[bool, ...]
    patch_layers: tuple[int, ...]

    @property
    def n_jobs(self) -> int:
        """Number of interventions (jobs) in the plan."""
        return len(self.starts)


def make_schedule(model: Transformer, ablation: Ablation, patch_layers: np.ndarray | None = None) -> Schedule:
    """The plan for a stack of ablations (concrete masks with a leading [n_jobs] axis) and, for
    activation patching, the patched layer of each job."""
    cfg = model.cfg
    masks = jax.tree.map(np.asarray, ablation)
    n_jobs = masks.replace_attn.shape[0]
    # changed[j, k] / whole[j, k]: job j changes sublayer k / replaces or deletes its whole write
    whole_attn = masks.replace_attn | masks.skip_attn
    changed_attn = whole_attn | masks.replace_heads.any(-1)
    if cfg.attn_only:
        changed, whole = changed_attn, whole_attn
    else:
        whole_mlp = masks.replace_mlp | masks.skip_mlp
        changed = np.stack([changed_attn, whole_mlp], axis=-1).reshape(n_jobs, -1)
        whole = np.stack([whole_attn, whole_mlp], axis=-1).reshape(n_jobs, -1)
    n_sublayers, per_layer = cfg.n_sublayers, cfg.sublayers_per_layer
    patch_layers = np.full(n_jobs, -1) if patch_layers is None else np.asarray(patch_layers)
    starts, cheap = [], []
    for j in range(n_jobs):
        first = int(np.argmax(changed[j])) if changed[j].any() else n_sublayers
        patched_at = patch_layers[j] * per_layer if patch_layers[j] >= 0 else n_sublayers
        start = min(first, patched_at)
        starts.append(start)
        cheap.append(bool(start < n_sublayers and start != patched_at and whole[j, start]))
    return Schedule(tuple(starts), tuple(cheap), tuple(int(p) for p in patch_layers))


def auto_chunk(model: Transformer, batch: int, seq: int, n_jobs: int, budget: int | None = None) -> int:
    """Lanes per chunk so that one chunk's largest transients (attention scores, MLP hidden, logits,
    float32) stay within `budget` bytes (default: by platform, see MEMORY_BUDGET)."""
    cfg = model.cfg
    if budget is None:
        budget = MEMORY_BUDGET.get(jax.default_backend(), DEFAULT_MEMORY_BUDGET)
    per_lane = 4 * batch * seq * (4 * cfg.d_model + cfg.n_heads * seq + 2 * (cfg.d_mlp or 0) + cfg.vocab_size)
    return int(max(1, min(n_jobs, budget // per_lane)))


def _map_lanes(fn: Callable, xs: Any, chunk: int) -> Any:
    n = jax.tree.leaves(xs)[0].shape[0]
    if n <= chunk:
        return jax.vmap(fn)(*xs)
    return jax.lax.map(lambda a: fn(*a), xs, batch_size=chunk)


def _stream_entering(cache: Cache, cfg: Any, k: int) -> jax.Array:
    """The base run's stream [batch, seq, d_model] entering sublayer k (k = n_sublayers: final)."""
    if k == cfg.n_sublayers:
        return cache["resid_final"]
    layer, kind = cfg.sublayer(k)
    return cache["resid_pre" if kind == "attn" else "resid_mid"][layer]


@dataclasses.dataclass
class _Lanes:
    """The state of `run_lanes`: the lanes that have started, in the order of `jobs`, and their
    streams [len(jobs), batch, seq, d_model] entering the next sublayer."""

    model: Transformer
    base: Cache
    ablation: Ablation
    replacement: Replacement
    schedule: Schedule
    source: Cache | None
    patch_positions: jax.Array | None
    chunk_size: int
    jobs: list[int] = dataclasses.field(default_factory=list)
    streams: jax.Array | None = None

    def entering(self, jobs: list[int], k: int) -> jax.Array:
        """Initial streams [len(jobs), batch, seq, d_model] of jobs that join at sublayer k: the
        base run's, with the source run's copied in where a job patches the stream entering k."""
        cfg = self.model.cfg
        shape = self.base["embed"].shape
        x = jnp.broadcast_to(_stream_entering(self.base, cfg, k), (len(jobs), *shape))
        patched = np.array([self.schedule.patch_layers[j] * cfg.sublayers_per_layer == k for j in jobs])
        if self.source is None or not patched.any():
            return x
        where = self.patch_positions[np.array(jobs)] & jnp.asarray(patched)[:, None]  # [jobs, seq]
        return jnp.where(where[:, None, :, None], _stream_entering(self.source, cfg, k)[None], x)

    def apply(self, k: int, jobs: list[int], streams: jax.Array, compute: bool) -> jax.Array:
        """Sublayer k applied to each lane under that lane's ablation; `compute=False` for lanes
        whose write there is replaced or deleted whole (its output is known)."""
        cfg = self.model.cfg
        layer, kind = cfg.sublayer(k)
        block = self.model.layer(layer)
        rope = self.model.rope(streams.shape[2])
        lane_masks = jax.tree.map(lambda m: m[np.array(jobs), layer], self.ablation)
        values = jax.tree.map(lambda v: v[layer], self.replacement)

        def one(resid: jax.Array, lane_ablation: Ablation) -> jax.Array:
            stream = ResidualStream(resid, {}, lane_ablation, values, residual=cfg.residual)
            return block.sublayer(kind, stream, rope, compute=compute).resid

        return _map_lanes(one, (streams, lane_masks), self.chunk_size)

    def step(self, k: int) -> None:
        """Let the jobs that start at k join, then run sublayer k on every lane."""
        new = [j for j in range(self.schedule.n_jobs) if self.schedule.starts[j] == k]
        fresh = [j for j in new if not self.schedule.cheap[j]]  # compute sublayer k from the base stream
        known = [j for j in new if self.schedule.cheap[j]]  # sublayer k's output is known
        computed, parts = self.jobs + fresh, []
        if computed:
            ongoing = [] if self.streams is None else [self.streams]
            x = jnp.concatenate([*ongoing, self.entering(fresh, k)]) if fresh else self.streams
            parts.append(self.apply(k, computed, x, compute=True))
        if known:
            parts.append(self.apply(k, known, self.entering(known, k), compute=False))
        if parts:
            self.streams = jnp.concatenate(parts) if len(parts) > 1 else parts[0]
            self.jobs = computed + known

    def finish(self) -> None:
        """Jobs that change nothing join at the end, as the base run's final stream."""
        n = self.model.cfg.n_sublayers
        untouched = [j for j in range(self.schedule.n_jobs) if self.schedule.starts[j] == n]
        if untouched:
            x = self.entering(untouched, n)
            self.streams = x if self.streams is None else jnp.concatenate([self.streams, x])
            self.jobs = self.jobs + untouched


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
    chunk_size: int,
) -> Any:
    """Run every job of `schedule` and return `readout(logits [batch, seq, vocab])` for each, stacked
    on a leading [n_jobs] axis in job order. Traced: call it inside a jit.

    base:   the cache of the unablated run, with "resid_pre" and "resid_mid" recorded.
    ablation: masks with a leading [n_jobs] axis; replacement: values shared by all jobs.
    source, patch_positions [n_jobs, seq]: for patching, the run whose stream is copied in at each
    job's patched layer, at the positions marked True.
    """
    lanes = _Lanes(model, base, ablation, replacement, schedule, source, patch_positions, chunk_size)
    for k in range(model.cfg.n_sublayers):
        lanes.step(k)
    lanes.finish()
    out = _map_lanes(lambda resid: readout(model.unembed(resid)[0]), (lanes.streams,), chunk_size)
    position = np.argsort(np.array(lanes.jobs))  # lane order -> job order
    return jax.tree.map(lambda x: x[position], out)
