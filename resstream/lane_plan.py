"""The plan of a vectorised run (`resstream.vectorised`): where each job starts, which jobs share a
group, how many lanes are carried and evaluated at once, and, for deep models, the cohorts of
jobs that run together from one layer. Plain data, fixed before anything is traced."""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import numpy as np
from flax import nnx

from resstream.interventions import Ablation
from resstream.model import Transformer

# Deeper models run their jobs in cohorts through one loop over the layers. A cohort starts at its
# earliest job's first change, which costs its later jobs some shared work, so models of typical
# depth stay unrolled (README, "Benchmarks": benchmarks/ablation.py --depths).
UNROLLED_LAYERS = 16
MIN_COHORTS = 6

# Bytes of temporaries that the lanes evaluated at once should take, for speed: on CPU a chunk's
# attention scores must stay near the caches (narrow chunks ran faster there; benchmarks/ablation.py);
# accelerators want wide chunks, up to what the memory budget allows.
FAST_CHUNK_BYTES = {"cpu": 64 << 20}


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

    def keys(self) -> list[tuple[int, bool, int]]:
        """Per job, its structure: (start, cheap, patched layer). Jobs with one key are interchangeable."""
        return list(zip(self.starts, self.cheap, self.patch_layers, strict=True))


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
        if cfg.parallel_attn and first < n_sublayers:
            first -= first % per_layer  # a parallel block's MLP reads the layer's input: start there
        patched_at = patch_layers[j] * per_layer if patch_layers[j] >= 0 else n_sublayers
        if patched_at < n_sublayers and first < patched_at:
            raise ValueError(f"job {j} changes sublayer {first} before its patch at layer {patch_layers[j]}")
        start = min(first, patched_at)
        starts.append(start)
        cheap.append(bool(start < n_sublayers and start != patched_at and whole[j, start]))
    return Schedule(tuple(starts), tuple(cheap), tuple(int(p) for p in patch_layers))


@dataclasses.dataclass(frozen=True)
class LanePlan:
    """How much of a study runs at once: at most `lanes` lanes carried (a group of jobs), `chunk`
    of them evaluated at once. `min_lanes`: the fewest a group can have (one per job structure; for
    a deep model, whose cohorts carry one chunk of lanes, `lanes` itself, so only the chunk shrinks)."""

    lanes: int
    chunk: int
    min_lanes: int = 1

    def smaller(self) -> LanePlan | None:
        """The next plan down (half the lanes and half the chunk), or None from the smallest."""
        if self.chunk == 1 and self.lanes <= self.min_lanes:
            return None
        lanes = max(self.min_lanes, self.lanes // 2)
        return dataclasses.replace(self, lanes=lanes, chunk=max(1, min(lanes, self.chunk // 2)))


def plan_lanes(
    model: Transformer,
    batch: int,
    seq: int,
    schedule: Schedule,
    budget: int,
    *,
    chunk_size: int | None = None,
    group_size: int | None = None,
) -> LanePlan:
    """The first plan to try for `schedule` on [batch, seq] tokens within `budget` bytes, from
    estimates of what one lane carries and one lane's temporaries take (float32). `chunk_size` /
    `group_size` fix the chunk / the lanes per group instead. `resstream.memory.run_within` checks
    the estimate against the compiled program and shrinks the plan if it was too hopeful."""
    cfg = model.cfg
    n_keys = len(set(schedule.keys()))
    stream = 4 * batch * seq * cfg.d_model
    temporaries = 4 * batch * seq * (4 * cfg.d_model + cfg.n_heads * seq + 2 * (cfg.d_mlp or 0) + cfg.vocab_size)
    params = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(nnx.state(model)))
    fixed = params + stream * (4 * cfg.n_layers + 8) + 3 * 4 * batch * seq * cfg.vocab_size  # base run, records
    spare = max(budget - fixed, 0) // 2  # half for carried lanes, half for temporaries
    fast = FAST_CHUNK_BYTES.get(jax.default_backend(), spare)
    chunk = chunk_size or max(1, min(fast, spare) // temporaries)
    lanes = group_size or max(1, spare // (3 * stream))  # a lane's stream, its concatenated copy, its output
    lanes = max(n_keys, min(lanes, schedule.n_jobs)) if group_size is None else max(n_keys, lanes)
    # A deep model's cohorts carry one chunk of lanes (make_cohorts): only the chunk can shrink.
    return LanePlan(lanes, max(1, min(chunk, lanes)), min_lanes=lanes if runs_in_cohorts(cfg) else n_keys)


@dataclasses.dataclass(frozen=True)
class Groups:
    """Jobs split into groups of one structure. `slots`: the schedule every group runs (one entry
    per lane); `members` [n_groups, n_slots]: the job in each slot (a repeat where a group is short
    of jobs of some structure); `where` [n_jobs]: the flat slot holding each job's result."""

    slots: Schedule
    members: np.ndarray
    where: np.ndarray


def make_groups(schedule: Schedule, lanes: int) -> Groups:
    """The fewest groups whose shared structure has at most `lanes` slots (at least one per job
    structure), so as few slots as possible are repeats."""
    by_key: dict[tuple, list[int]] = {}
    for j, key in enumerate(schedule.keys()):
        by_key.setdefault(key, []).append(j)
    keys = sorted(by_key)
    largest = max(len(jobs) for jobs in by_key.values())
    n_groups = next((n for n in range(1, largest + 1) if sum(-(-len(by_key[k]) // n) for k in keys) <= lanes), largest)
    members, slot_keys, where = [], [], np.zeros(schedule.n_jobs, np.int64)
    for key in keys:
        jobs, per_group = by_key[key], -(-len(by_key[key]) // n_groups)
        padded = jobs + [jobs[0]] * (n_groups * per_group - len(jobs))
        members.append(np.array(padded).reshape(n_groups, per_group))
        slot_keys += [key] * per_group
    members = np.concatenate(members, axis=1)  # [n_groups, n_slots]
    n_slots = members.shape[1]
    for flat in range(members.size - 1, -1, -1):  # each job's first occurrence holds its result
        where[members.flat[flat]] = flat
    starts, cheap, patch_layers = zip(*slot_keys, strict=True)
    return Groups(Schedule(starts, cheap, patch_layers), members.reshape(n_groups, n_slots), where)


def runs_in_cohorts(cfg: Any) -> bool:
    """Whether a model of `cfg`'s depth runs its jobs in cohorts (deeper than UNROLLED_LAYERS)."""
    return cfg.n_layers > UNROLLED_LAYERS


@dataclasses.dataclass(frozen=True)
class Cohorts:
    """A deep model's jobs in cohorts of equal size, each run from one layer to the last.
    `starts` [n_cohorts]: the layer each cohort starts at (n_layers: its jobs change nothing);
    `members` [n_cohorts, n_slots]: the job in each slot (a repeat in a short cohort);
    `where` [n_jobs]: the flat slot holding each job's result."""

    starts: np.ndarray
    members: np.ndarray
    where: np.ndarray


def make_cohorts(model: Transformer, schedule: Schedule, plan: LanePlan) -> Cohorts | None:
    """Cohorts for a model deeper than UNROLLED_LAYERS, else None. Jobs are taken in order of the
    layer of their first change (ablated or patched) and cut into cohorts of at most `plan.chunk`
    jobs, and into at least MIN_COHORTS. A job runs from its cohort's start, which leaves it as it
    was up to its first change; in a sweep, whose first changes spread evenly over the layers, that
    is at most about n_layers / MIN_COHORTS layers early."""
    cfg = model.cfg
    if not runs_in_cohorts(cfg):
        return None
    first_layers = np.array(schedule.starts) // cfg.sublayers_per_layer  # n_layers: changes nothing
    order = np.argsort(first_layers, kind="stable")
    size = max(1, min(plan.chunk, schedule.n_jobs // MIN_COHORTS))
    n_cohorts = -(-schedule.n_jobs // size)
    padded = np.concatenate([order, np.full(n_cohorts * size - len(order), order[-1])])  # repeats of the last job
    members = padded.reshape(n_cohorts, size)
    where = np.empty(schedule.n_jobs, np.int64)
    where[order] = np.arange(schedule.n_jobs)  # each job's first slot (repeats come after)
    return Cohorts(first_layers[members[:, 0]], members, where)
