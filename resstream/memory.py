"""Memory budgets, checked against XLA's own accounting of each compiled program.

Every analysis, sweep, deletion and patching call compiles its program ahead of time, reads the
program's peak memory from `compiled.memory_analysis()` (arguments + outputs + temporaries, the
whole device footprint of the call), and runs it only if that fits the budget. Calls that run many
interventions are given a `plan` (how many lanes they carry and evaluate at once); when a plan's
program does not fit, a smaller plan is compiled, down to the smallest there is, and if even that
does not fit the call raises `MemoryBudgetError` before anything runs.

    >>> ablation_sweep(model, tokens, "heads", memory_budget=8 << 30)
    >>> with measure_only() as measured:        # compile and account, run nothing
    ...     model.run_with_cache(tokens)
    >>> measured[0].peak / 2**30

The budget defaults to `DEFAULT_FRACTION` of the device's memory: what XLA may allocate on a GPU or
TPU, the machine's physical memory on CPU. With the default budget a call on GPUs or TPUs must also
fit the room on each of its devices now (`room_now`: the free bytes plus what its arguments already
hold there; arrays a notebook still holds are not free), so a call that would run out of device
memory shrinks its plan or raises `MemoryBudgetError` instead. That check is skipped on many hosts,
where every host must choose the same plan. A budget given explicitly is the whole check. Inside a
user's `jit` nothing is compiled separately, so nothing is checked there: the call inlines into the
user's program with the plan it would start from.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import functools
import os
from collections import OrderedDict
from collections.abc import Callable, Iterator
from typing import Any

import jax

DEFAULT_FRACTION = 0.75
_COMPILED_CACHE_SIZE = 64


class MemoryBudgetError(ValueError):
    """A call whose compiled program needs more memory than its budget, even with its smallest plan."""


def device_memory(device: jax.Device | None = None) -> int:
    """Bytes the device can hold: XLA's allocation limit on a GPU or TPU, physical memory on CPU."""
    device = device or jax.devices()[0]
    stats = device.memory_stats() if device.platform != "cpu" else None
    if stats and stats.get("bytes_limit"):
        return int(stats["bytes_limit"])
    return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def free_device_memory(device: jax.Device) -> int | None:
    """Bytes XLA can still allocate on a GPU or TPU now (its limit less what is in use); None on CPU,
    or where the device reports no such statistics."""
    stats = device.memory_stats() if device.platform != "cpu" else None
    if not stats or "bytes_limit" not in stats or "bytes_in_use" not in stats:
        return None
    return int(stats["bytes_limit"]) - int(stats["bytes_in_use"])


def _concrete(leaves: list) -> list[jax.Array]:
    return [x for x in leaves if isinstance(x, jax.Array) and not isinstance(x, jax.core.Tracer)]


def resident_bytes(leaves: list, device: jax.Device) -> int:
    """Bytes of `leaves` already held on `device`: the jax arrays' shards there."""
    return sum(shard.data.nbytes for x in _concrete(leaves) for shard in x.addressable_shards if shard.device == device)


def room_now(leaves: list) -> int | None:
    """The bytes a call on `leaves` may take on its tightest device now: there, the free bytes plus
    those its arguments already hold. None on CPU, where a device reports no statistics, and on many
    hosts (each host would read its own devices, and every host must choose the same plan)."""
    if jax.process_count() > 1:
        return None
    devices = {d for x in _concrete(leaves) for d in x.sharding.device_set} or {jax.local_devices()[0]}
    rooms = []
    for device in devices:
        free = free_device_memory(device)
        if free is None:
            return None
        rooms.append(free + resident_bytes(leaves, device))
    return min(rooms)


def plan_budget(budget: int | None, args: Any) -> int:
    """The budget a call's first plan is sized for: `budget` (resolved), and with the default budget
    at most the room on the device now (`room_now`), so a tight device does not start with a plan
    that must be halved and compiled again."""
    room = room_now(jax.tree.leaves(args)) if budget is None else None
    return resolve_budget(budget) if room is None else min(resolve_budget(budget), room)


def resolve_budget(budget: int | None) -> int:
    """`budget` in bytes, or by default `DEFAULT_FRACTION` of the device's memory."""
    if budget is None:
        return int(DEFAULT_FRACTION * device_memory())
    if isinstance(budget, bool) or not isinstance(budget, int) or budget <= 0:
        raise MemoryBudgetError(f"memory_budget={budget!r}: give a positive number of bytes (e.g. 8 << 30 for 8 GiB)")
    return budget


def peak_bytes(compiled: jax.stages.Compiled) -> int:
    """A compiled program's device footprint: arguments + outputs + temporaries - aliased bytes."""
    m = compiled.memory_analysis()
    return m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes - m.alias_size_in_bytes


def gib(n_bytes: float) -> str:
    """Bytes as GiB, for messages."""
    return f"{n_bytes / 2**30:.2f} GiB"


@dataclasses.dataclass(frozen=True)
class Measured:
    """One budgeted call: what it was, its compiled peak in bytes, the budget, the plan it ran with."""

    what: str
    peak: int
    budget: int
    plan: Any = None
    # With the default budget on a GPU or TPU, the room on the device when the call was checked
    # (`room_now`), which the peak had to fit as well.
    room: int | None = None


_measuring: contextvars.ContextVar[list[Measured] | None] = contextvars.ContextVar("measuring", default=None)


@contextlib.contextmanager
def measure_only() -> Iterator[list[Measured]]:
    """Within this block budgeted calls compile and record a `Measured` in the yielded list, and
    return abstract results (`jax.ShapeDtypeStruct`s) without running. Inputs may be abstract too
    (a model from `nnx.eval_shape`), so a call too big for this machine can still be accounted; give
    it a `memory_budget=`, since the default one on a GPU or TPU also fits the room there now, in
    which abstract inputs hold nothing."""
    measured: list[Measured] = []
    token = _measuring.set(measured)
    try:
        yield measured
    finally:
        _measuring.reset(token)


_compiled: OrderedDict[Any, tuple[jax.stages.Compiled, int]] = OrderedDict()


def _signature(x: Any) -> Any:
    return (x.shape, x.dtype, getattr(x, "weak_type", False), getattr(x, "sharding", None))


@functools.partial(jax.jit, static_argnames=("fn", "treedef", "static"))
def _flat_call(leaves: list, *, fn: Callable, treedef: Any, static: tuple) -> Any:
    """`fn(*args, **static)` from the leaves of `args`: its compiled form is called with a flat
    list of arrays, so a call does not flatten the model's modules again (Python work per module)."""
    return fn(*jax.tree.unflatten(treedef, leaves), **dict(static))


def _compile(fn: Callable, leaves: list, treedef: Any, static: dict[str, Any]) -> tuple[jax.stages.Compiled, int]:
    """`fn` compiled for the arguments flattened to `leaves` and `treedef`, and its peak bytes,
    cached: a call repeated from a notebook pays neither the compile nor the memory analysis again."""
    static_items = tuple(sorted(static.items()))
    key = (fn, treedef, tuple(_signature(x) for x in leaves), static_items)
    if key in _compiled:
        _compiled.move_to_end(key)
        return _compiled[key]
    compiled = _flat_call.lower(leaves, fn=fn, treedef=treedef, static=static_items).compile()
    _compiled[key] = compiled, peak_bytes(compiled)
    if len(_compiled) > _COMPILED_CACHE_SIZE:
        _compiled.popitem(last=False)
    return _compiled[key]


def run_within(
    fn: Callable,
    args: tuple,
    static: dict[str, Any] | None = None,
    *,
    budget: int | None,
    what: str,
    hint: str = "",
    smaller: Callable[[Any], Any] | None = None,
) -> Any:
    """`fn(*args, **static)` (a `jax.jit` function, `static` its static arguments), run only if its
    compiled peak fits `budget` bytes (None: the default budget).

    `static["plan"]`, if present, is how much work the call does at once; `smaller(plan)` gives the
    next smaller plan, or None when there is none. Plans are tried until one fits; if none does,
    `MemoryBudgetError` says what was needed, and `hint` how to need less."""
    static = dict(static or {})
    leaves, treedef = jax.tree.flatten(args)
    if any(isinstance(x, jax.core.Tracer) for x in leaves) or jax.config.jax_disable_jit:
        return fn(*args, **static)  # inside a user's jit (or none): nothing to check
    room = room_now(leaves) if budget is None else None
    budget = resolve_budget(budget)
    while True:
        compiled, peak = _compile(fn, leaves, treedef, static)
        if peak <= budget and (room is None or peak <= room):
            break
        plan = smaller(static["plan"]) if smaller is not None and "plan" in static else None
        if plan is None:
            raise MemoryBudgetError(_too_big(what, peak, budget, room, hint))
        static["plan"] = plan
    measured = _measuring.get()
    if measured is not None:
        measured.append(Measured(what, peak, budget, static.get("plan"), room))
        return jax.eval_shape(lambda *a: fn(*a, **static), *args)
    return compiled(leaves)


def _too_big(what: str, peak: int, budget: int, room: int | None, hint: str) -> str:
    """The error for a call whose smallest plan does not fit: over its budget, or over the room now."""
    if peak > budget:
        return (
            f"{what} needs {gib(peak)} of device memory (XLA's compiled peak), over its budget of {gib(budget)}"
            f"{hint}; or raise memory_budget= (in bytes) if the device has the room"
        )
    return (
        f"{what} needs {gib(peak)} of device memory (XLA's compiled peak), but the device has only {gib(room)} "
        f"now (what is free, and what the call's arguments hold there){hint}; or free arrays you no longer "
        "need (caches, other models), or pass memory_budget= (in bytes) to check against a budget of your own"
    )
