"""A cache seen through a selection of sequences and positions, and the compiled call around an
analysis function that reads it.

`CacheView` applies `batch` and `pos` (an int, a slice or an index array) to each cache entry on
first use, so an analysis of one position of a long batch touches one position's memory. The
selection's shape is `[*batch, *pos]`: an int drops its axis, a slice or None keeps it, an index
array puts its own shape there (`batch` and `pos` index separately: an outer product).

`compiled_analysis` runs an analysis function `fn(model, cache, ...)` as one compiled program:
- arrays, token ids and integer `pos` / `batch` are traced (an int becomes a 0-d int32 array, which
  drops its axis exactly as an int does), so a loop over positions or sequences compiles once;
- every other argument (layer, mid, split_heads, a slice, ...) is static: a new value compiles anew;
- a known `pos` / `batch` entry out of range raises IndexError, and a known token id outside the
  vocabulary TokenError, before anything runs: a JAX gather would clamp it to the last row. Python
  ints are known even inside a user's `jit`, so they raise there too;
- inside a user's `jit`, where traced indices cannot raise, the rows they select come back NaN;
- every call takes `memory_budget=` (bytes): the compiled program runs only if its peak fits, else
  `resstream.memory.MemoryBudgetError` says what it needed (see `resstream.memory`).

This module knows nothing of what an analysis computes: it needs only that the result has
`.values` [n_rows, *selection, ...] and `.replace(values=...)` (a flax struct dataclass).
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from resstream.memory import run_within
from resstream.model import LAYER_RECORDS, Cache, TokenError, Transformer
from resstream.stream import OPTIONAL_RECORDS

Index = int | slice | jax.Array | Any  # None (everything), an int, a slice, or an integer index array
SELECTIONS = ("batch", "pos")  # the arguments that select from the cache, and their axes in order


def take(x: jax.Array, axis: int, index: Index) -> jax.Array:
    """x [..., n, ...] indexed on `axis` by `index` (None: unchanged). An int or a 0-d array drops
    the axis; a slice keeps it; an index array of shape s puts s in its place."""
    return x if index is None else x[(slice(None),) * axis + (index,)]


class CacheView:
    """The cache with `batch` and `pos` selected: `view[key]` is the entry with its batch and
    position axes indexed (and cast to float32), computed on first use and kept.

    A `[n_layers, batch, seq, ...]` entry (`attn_out`, `z`, `ln1_scale`, ...) becomes
    `[n_layers, *selection, ...]`, a `[batch, seq, ...]` entry (`embed`, `resid_final`, ...)
    `[*selection, ...]`; `pattern` `[n_layers, batch, head, q, k]` is selected on its query axis."""

    def __init__(self, cache: Cache, batch: Index = None, pos: Index = None):
        self.cache, self.batch, self.pos, self._done = cache, batch, pos, {}

    @property
    def stream_shape(self) -> tuple[int, int]:
        """The cache's [batch, seq], before selection."""
        return tuple(self.cache["embed"].shape[:2])

    def select(self, x: jax.Array, batch_axis: int = 0, seq_axis: int | None = None) -> jax.Array:
        """x with a batch axis (at `batch_axis`) and a sequence axis (at `seq_axis`, by default the
        next one), selected as the cache is: [..., batch, seq, ...] -> [..., *selection, ...]."""
        seq_axis = batch_axis + 1 if seq_axis is None else seq_axis
        return take(take(x, seq_axis, self.pos), batch_axis, self.batch)

    def token_ids(self, ids: Any, name: str, select_tokens: bool) -> jax.Array:
        """Token ids [*selection] from `ids` (the argument `name`): one id, used at every position;
        by default ids shaped like the selection (or broadcastable to it); with `select_tokens`, ids
        for the cache's whole [batch, seq], selected as the cache is. Other shapes raise ValueError."""
        ids, shape, full = jnp.asarray(ids), self["embed"].shape[:-1], self.stream_shape
        if not jnp.issubdtype(ids.dtype, jnp.integer):
            raise ValueError(f"{name} must be integer token ids, got dtype {ids.dtype}")
        # int32 before any comparison: uint8 ids (ByteTokenizer.encode's) cannot hold the vocabulary size
        ids = ids.astype(jnp.int32)
        if ids.ndim and select_tokens:
            if ids.shape != full:
                raise ValueError(
                    f"{name} has shape {ids.shape}: with select_tokens=True, pass ids for the cache's whole "
                    f"[batch, seq] = {full} (or one id), or ids shaped like the selection {shape} without it"
                )
            ids = self.select(ids)
        elif not _broadcasts(ids.shape, shape):
            raise ValueError(
                f"{name} has shape {ids.shape}, which does not fit the selection's shape {shape}: pass ids "
                f"shaped like the selection (or broadcastable to it), or ids for the cache's whole [batch, seq] "
                f"= {full} with select_tokens=True to have them selected with pos/batch as the cache is"
            )
        return jnp.broadcast_to(ids, shape)

    def __contains__(self, key: str) -> bool:
        return key in self.cache

    def get(self, key: str, default: Any = None) -> Any:
        """`self[key]` if the cache holds `key`, else `default`."""
        return self[key] if key in self.cache else default

    def __getitem__(self, key: str) -> jax.Array:
        if key not in self._done:
            if key not in self.cache:
                hint = "model.run_with_cache(tokens) (mode='full')"
                if key in OPTIONAL_RECORDS:
                    hint = f"model.run_with_cache(tokens, record=({key!r},))"
                raise KeyError(f"the cache has no {key!r}: make it with {hint}")
            batch_axis = 1 if key in LAYER_RECORDS else 0
            seq_axis = batch_axis + (2 if key == "pattern" else 1)  # pattern: [.., batch, head, q, k]
            self._done[key] = self.select(self.cache[key], batch_axis, seq_axis).astype(jnp.float32)
        return self._done[key]


def _broadcasts(shape: tuple[int, ...], to: tuple[int, ...]) -> bool:
    try:
        return np.broadcast_shapes(shape, to) == to
    except ValueError:
        return False


# ------------------------------------------------------------------------------- compilation
@dataclasses.dataclass(frozen=True)
class _Slice:
    """A slice as a hashable static argument (slices are unhashable before Python 3.12)."""

    start: Any
    stop: Any
    step: Any


def _is_int(value: Any) -> bool:
    return isinstance(value, int | np.integer) and not isinstance(value, bool)


def compiled_analysis(fn: Callable | None = None, *, token_args: tuple[str, ...] = ()) -> Callable:
    """Decorator: run `fn(model, cache, ...)` as one compiled call, cached on the model's structure
    and the static arguments (see the module docstring for what is traced and what is static).
    `token_args` names the arguments that hold token ids: they are traced even when given as a
    Python int, and checked against the vocabulary. Called eagerly (from a notebook) this is one
    compiled call instead of dozens of dispatched ops; inside a user's `jit` it inlines."""
    if fn is None:
        return functools.partial(compiled_analysis, token_args=token_args)
    signature = inspect.signature(fn)

    @functools.wraps(fn)
    def wrapper(model: Transformer, cache: Cache, *args: Any, memory_budget: int | None = None, **kwargs: Any) -> Any:
        bound = signature.bind(model, cache, *args, **kwargs)
        bound.apply_defaults()
        arguments = dict(list(bound.arguments.items())[2:])
        _check_indices(model, cache, arguments, token_args)
        traced, static = {}, []
        for name, value in arguments.items():
            if name in SELECTIONS and _is_int(value):  # traced: one program for every position
                traced[name] = jnp.asarray(value, jnp.int32)
            elif isinstance(value, jax.Array | np.ndarray | list) or (name in token_args and value is not None):
                traced[name] = jnp.asarray(value)
            elif isinstance(value, slice):
                static.append((name, _Slice(value.start, value.stop, value.step)))
            else:
                static.append((name, value))
        out = run_within(
            _run_compiled,
            (model, cache, traced),  # the model is a pytree: its structure keys the compile
            {"fn": fn, "static": tuple(static)},
            budget=memory_budget,
            what=fn.__name__,
            hint=": select less with pos= (one position, or a few) or batch=",
        )
        if any(isinstance(arguments.get(name), jax.core.Tracer) for name in SELECTIONS):
            out = _nan_outside(cache, arguments, out)
        return out

    return wrapper


@functools.partial(jax.jit, static_argnames=("fn", "static"))
def _run_compiled(model: Transformer, cache: Cache, traced: dict, *, fn: Callable, static: tuple) -> Any:
    kwargs = dict(traced)
    for name, value in static:
        kwargs[name] = slice(value.start, value.stop, value.step) if isinstance(value, _Slice) else value
    return fn(model, cache, **kwargs)


# ---------------------------------------------------------------------------------- checking
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


def _check_indices(model: Transformer, cache: Cache, arguments: dict[str, Any], token_args: tuple[str, ...]) -> None:
    """Raise IndexError for a known `pos` / `batch` entry outside the cache, and TokenError for a
    known token id (in the arguments named by `token_args`) outside the vocabulary: a JAX gather
    would clamp either to the last row silently. Traced values are left to `_nan_outside`."""
    if "embed" in cache:  # a stats cache has none: the view's KeyError explains what to record
        for name, n, what in zip(SELECTIONS, cache["embed"].shape[:2], ("sequences", "positions"), strict=True):
            if found := _first_outside(arguments.get(name), -n, n):
                value, at = found
                label = f"{name}={value}" if not at else f"{name} entry {value}{at}"
                raise IndexError(
                    f"{label} is out of range: the cache holds {n} {what} (0..{n - 1}, or {-n}..-1 from the end)"
                )
    vocab = model.cfg.vocab_size
    for name in token_args:
        if found := _first_outside(arguments.get(name), 0, vocab):
            value, at = found
            fix = "token ids are not Python indices" if value < 0 else "check the tokenizer matches the model"
            raise TokenError(f"token id {value} is outside the vocabulary [0, {vocab}): `{name}` holds it{at}; {fix}")


def _nan_outside(cache: Cache, arguments: dict[str, Any], out: Any) -> Any:
    """NaN at every sequence and position that a traced `batch` / `pos` selects out of range.
    Such indices cannot raise; the gathers clamped them to another row, and rows that do not read
    the cache at all (biases) would look valid. `out.values` is [n, *selection, ...]."""
    valid = np.ones((), bool)
    for name, n in zip(SELECTIONS, cache["embed"].shape[:2], strict=True):
        index = arguments.get(name)
        if isinstance(index, jax.core.Tracer):
            ok = (index >= -n) & (index < n)
        else:  # checked already; an int drops its axis, None or a slice keeps one
            ok = np.ones((1,) * (1 if index is None or isinstance(index, slice) else np.ndim(index)), bool)
        valid = valid.reshape(valid.shape + (1,) * ok.ndim) & ok
    valid = valid.reshape(1, *valid.shape, *(1,) * (out.values.ndim - 1 - valid.ndim))
    return out.replace(values=jnp.where(valid, out.values, jnp.nan))
