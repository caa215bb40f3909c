"""Activation patching of the residual stream: which (layer, position) carries the information.

Run a clean and a corrupted prompt. Then, for each layer l and position p, rerun the corrupted
prompt with the stream entering layer l at position p replaced by the clean run's, and measure the
logit difference logit[answer] - logit[wrong] at the last position. Where patching restores the
clean difference, that piece of the stream carries what the corruption removed.

Every (layer, position) is one job of `resstream.vectorised.run_lanes`: a patch at layer l shares
the corrupted run's first l layers, so the whole grid is one compiled call doing about half the
work of n_layers * seq separate forward passes.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx, struct

from resstream.interventions import AblationError, no_ablation, stack, zero_replacement
from resstream.lane_plan import LanePlan, Schedule, make_schedule, plan_lanes
from resstream.memory import plan_budget, run_within
from resstream.model import Transformer, check_tokens
from resstream.sharding import mesh_context
from resstream.vectorised import run_lanes


@struct.dataclass
class PatchingResult:
    """logit_diff [n_layers, seq]: the corrupted run's logit difference with the clean stream
    patched in at (layer, position); clean_diff, corrupted_diff: the unpatched runs' (scalars, mean
    over the batch). `recovered` = (patched - corrupted) / (clean - corrupted): 1 where the patch
    restores the clean behaviour, 0 where it changes nothing; NaN everywhere when the clean and
    corrupted runs have the same logit difference, since there is then nothing to recover."""

    logit_diff: jax.Array
    clean_diff: jax.Array
    corrupted_diff: jax.Array

    @property
    def recovered(self) -> jax.Array:
        """[n_layers, seq]: (patched - corrupted) / (clean - corrupted); NaN when clean == corrupted."""
        gap = self.clean_diff - self.corrupted_diff
        safe = jnp.where(gap == 0, 1.0, gap)
        return jnp.where(gap == 0, jnp.nan, (self.logit_diff - self.corrupted_diff) / safe)


def _logit_diff(model: Transformer, resid: jax.Array, answer: jax.Array, wrong: jax.Array) -> jax.Array:
    """Mean over the batch of logit[answer] - logit[wrong] at the last position, from the final
    stream [batch, seq, d_model]; answer, wrong [batch]. Only the last position is unembedded."""
    last = model.unembed(resid[:, -1])[0]  # [batch, vocab]
    rows = jnp.arange(last.shape[0])
    return jnp.mean(last[rows, answer] - last[rows, wrong])


def _answers(ids: Any, batch: int, vocab: int, name: str) -> jax.Array:
    ids = np.broadcast_to(np.asarray(ids), (batch,))
    if not np.issubdtype(ids.dtype, np.integer) or ((ids < 0) | (ids >= vocab)).any():
        raise AblationError(f"{name} must be token ids in [0, {vocab}) (one, or one per sequence), got {ids}")
    return jnp.asarray(ids, jnp.int32)


def _checked_pair(model: Transformer, clean: Any, corrupted: Any) -> tuple[jax.Array, jax.Array]:
    clean, corrupted = check_tokens(clean, model.cfg), check_tokens(corrupted, model.cfg)
    if clean.shape != corrupted.shape:
        raise AblationError(
            f"clean tokens have shape {tuple(clean.shape)} and corrupted tokens {tuple(corrupted.shape)}: patching "
            "copies the stream position by position, so the two prompts must have the same shape"
        )
    return clean, corrupted


@functools.partial(jax.jit, static_argnames=("graphdef", "schedule", "plan", "readout", "jobs_shape", "read_last"))
def _patched(
    state,
    clean,
    corrupted,
    masks,
    positions,
    args,
    *,
    graphdef,
    schedule: Schedule,
    plan: LanePlan,
    readout,
    jobs_shape,
    read_last,
):
    model = nnx.merge(graphdef, state)
    record = ("resid_pre", "resid_mid")
    _, clean_cache = model.forward(clean, record=record)
    _, corrupted_cache = model.forward(corrupted, record=record)

    def read(resid: jax.Array) -> jax.Array:
        return readout(model, resid, *args)

    out = run_lanes(
        model, corrupted_cache, masks, zero_replacement(model.cfg), schedule, read,
        source=clean_cache, patch_positions=positions, plan=plan, read_last=read_last,
    )  # fmt: skip
    out = jax.tree.map(lambda x: x.reshape(*jobs_shape, *x.shape[1:]), out)
    return out, read(clean_cache["resid_final"]), read(corrupted_cache["resid_final"])


def _run(
    model: Transformer,
    clean: jax.Array,
    corrupted: jax.Array,
    layers: np.ndarray,
    positions: np.ndarray,
    readout: Callable,
    args: tuple,
    *,
    jobs_shape: tuple[int, ...] | None = None,
    read_last: int | None = None,
    chunk_size: int | None = None,
    group_size: int | None = None,
    memory_budget: int | None = None,
) -> Any:
    """(readout per job [n_jobs, ...], the clean run's, the corrupted run's) for jobs patching the
    clean stream into the corrupted run at `layers` [n_jobs] and `positions` [n_jobs, seq]; the
    jobs' axis reshaped to `jobs_shape`. `read_last=n`: the readout reads only the last n positions."""
    n_jobs = len(layers)
    masks = stack([no_ablation(model.cfg)] * n_jobs)
    schedule = make_schedule(model, masks, patch_layers=layers)
    budget = plan_budget(memory_budget, (model, clean, corrupted))
    plan = plan_lanes(
        model,
        *clean.shape,
        schedule,
        budget,
        chunk_size=chunk_size,
        group_size=group_size,
    )
    graphdef, state = nnx.split(model)
    jobs_shape = jobs_shape or (n_jobs,)
    static = {"graphdef": graphdef, "schedule": schedule, "plan": plan, "readout": readout, "jobs_shape": jobs_shape}
    static["read_last"] = read_last
    hint = f": use fewer or shorter prompts than {tuple(clean.shape)}"
    with mesh_context(state):
        return run_within(
            _patched, (state, clean, corrupted, masks, jnp.asarray(positions), args), static, budget=memory_budget,
            what=f"patching {n_jobs} (layer, position) pairs", hint=hint, smaller=LanePlan.smaller,
        )  # fmt: skip


def _identity(model: Transformer, resid: jax.Array) -> jax.Array:
    return model.unembed(resid)[0]


def run_patched(
    model: Transformer,
    clean_tokens: Any,
    corrupted_tokens: Any,
    layer: int,
    positions: Any = None,
    *,
    memory_budget: int | None = None,
) -> jax.Array:
    """Logits [batch, seq, vocab] of the corrupted run with the clean stream entering `layer`
    patched in at `positions` (indices or a boolean mask over seq; None: every position), within
    `memory_budget` bytes (see `resstream.memory`)."""
    clean, corrupted = _checked_pair(model, clean_tokens, corrupted_tokens)
    seq = clean.shape[1]
    layer = model.cfg.check_layer(layer, error=AblationError)
    mask = np.ones(seq, bool) if positions is None else np.zeros(seq, bool)
    if positions is not None:
        try:
            mask[np.asarray(positions)] = True
        except IndexError as err:
            raise AblationError(f"positions {positions} out of range: the prompts have positions 0..{seq - 1}") from err
    out, _, _ = _run(model, clean, corrupted, np.array([layer]), mask[None], _identity, (), memory_budget=memory_budget)
    return out[0]


def patch_resid(
    model: Transformer,
    clean_tokens: Any,
    corrupted_tokens: Any,
    answer_tokens: Any,
    wrong_tokens: Any,
    *,
    positions: Any = None,
    chunk_size: int | None = None,
    group_size: int | None = None,
    memory_budget: int | None = None,
) -> PatchingResult:
    """Patch the clean stream into the corrupted run at every (layer, position), one at a time, in
    one compiled call; returns the [n_layers, seq] grid of logit differences
    logit[answer] - logit[wrong] at the last position. `answer_tokens`, `wrong_tokens`: an id, or
    one per sequence. `positions` (indices): patch only those, for an [n_layers, len(positions)]
    grid whose columns follow them (default: every position). The call stays within `memory_budget`
    bytes (see `resstream.memory`); `chunk_size` / `group_size` override the plan it would choose, as
    for `ablation_sweep`."""
    clean, corrupted = _checked_pair(model, clean_tokens, corrupted_tokens)
    cfg = model.cfg
    batch, seq = clean.shape
    answer = _answers(answer_tokens, batch, cfg.vocab_size, "answer_tokens")
    wrong = _answers(wrong_tokens, batch, cfg.vocab_size, "wrong_tokens")
    columns = np.arange(seq) if positions is None else np.asarray(positions).reshape(-1)
    if not np.issubdtype(columns.dtype, np.integer) or ((columns < -seq) | (columns >= seq)).any() or not len(columns):
        raise AblationError(f"positions must be indices into the prompts' {seq} positions, got {positions}")
    layers = np.repeat(np.arange(cfg.n_layers), len(columns))
    patched = np.tile(np.eye(seq, dtype=bool)[columns], (cfg.n_layers, 1))  # job (l, p) patches position p
    grid, clean_diff, corrupted_diff = _run(
        model, clean, corrupted, layers, patched, _logit_diff, (answer, wrong),
        jobs_shape=(cfg.n_layers, len(columns)), read_last=1,  # the logit difference is read at the last position
        chunk_size=chunk_size, group_size=group_size, memory_budget=memory_budget,
    )  # fmt: skip
    return PatchingResult(grid, clean_diff, corrupted_diff)
