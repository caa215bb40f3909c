"""Checkpoints with orbax: the whole train state plus what is needed to resume exactly.

Each checkpoint holds the TrainState (parameters, optimizer state, step, RNG) and a JSON record of
the model config, the data sampler's position, the metrics and a checksum of every saved array.
Orbax writes into a temporary directory and renames it when complete, so an interrupted save never
leaves a checkpoint that looks whole. Orbax checks the integrity of its index but not of the array
data, so the checksums (saved in the same JSON record, atomically with the arrays) are verified on
every restore: a corrupt checkpoint is refused, never trained from. Kept: the last `keep_last` and
the best by validation loss.
"""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import logging
import shutil
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

from resstream.config import RUNTIME_FIELDS, ModelConfig


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used: unreadable, or made for another model."""


class CorruptCheckpointError(CheckpointError):
    """A checkpoint whose arrays cannot be read, or do not match the checksums saved with them."""

    def __init__(self, message: str, step: int):
        super().__init__(message)
        self.step = step


# ------------------------------------------------------------------------------ checksums
def _words(x: jax.Array) -> jax.Array:
    """The array's bits as uint32 words, one per element."""
    if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
        x = jax.random.key_data(x)
    if x.dtype == jnp.bool_:
        x = x.astype(jnp.uint8)
    unsigned = {1: jnp.uint8, 2: jnp.uint16, 4: jnp.uint32}[x.dtype.itemsize]
    return jax.lax.bitcast_convert_type(x, unsigned).astype(jnp.uint32)


def _positions(shape: tuple[int, ...]) -> jax.Array:
    """Each element's row-major index (mod 2**32), built from iotas so that a sharded array is
    never reshaped (which would gather it)."""
    index, stride = jnp.zeros(shape, jnp.uint32), 1
    for axis in reversed(range(len(shape))):
        index = index + jax.lax.broadcasted_iota(jnp.uint32, shape, axis) * np.uint32(stride % 2**32)
        stride *= shape[axis]
    return index


@jax.jit
def _checksums(tree: Any) -> list[jax.Array]:
    """Two position-weighted sums (mod 2**32) of each leaf's bits: uint32[2] per leaf.

    The weights are odd, hence invertible mod 2**32, so any change to a single element always
    changes the sum; wider damage goes unnoticed with probability about 2**-64. Integer sums are
    exact in any order, so the result does not depend on the device layout: a checkpoint saved on
    8 devices verifies on 1."""

    def one(x: jax.Array) -> jax.Array:
        words, index = _words(x), _positions(x.shape)
        first = jnp.sum(words * (index * np.uint32(0x9E3779B1) | np.uint32(1)), dtype=jnp.uint32)
        mixed = words ^ (words >> np.uint32(15))
        weights = (index + np.uint32(0x7F4A7C15)) * np.uint32(0x85EBCA6B) | np.uint32(1)
        second = jnp.sum(mixed * weights, dtype=jnp.uint32)
        return jnp.stack([first, second])

    return [one(x) for x in jax.tree.leaves(tree)]


def checksums(tree: Any) -> dict[str, str]:
    """{leaf path: 16 hex digits} for every array in `tree`, computed where the arrays live."""
    paths = [jax.tree_util.keystr(path) for path, _ in jax.tree_util.tree_flatten_with_path(tree)[0]]
    values = [np.asarray(s.addressable_data(0)) for s in _checksums(tree)]  # replicated scalars
    return {path: f"{int(a):08x}{int(b):08x}" for path, (a, b) in zip(paths, values, strict=True)}


# ------------------------------------------------------------------------------ checkpoints
class Checkpoints:
    """The checkpoints of one run directory. A context manager: leaving it closes orbax's manager."""

    def __init__(self, directory: str | Path, keep_last: int = 3):
        self.directory = Path(directory).absolute()
        policy = ocp.checkpoint_managers.AnyPreservationPolicy(
            [
                ocp.checkpoint_managers.LatestN(n=keep_last),
                ocp.checkpoint_managers.BestN(
                    get_metric_fn=lambda m: m["val_loss"], reverse=True, n=1, keep_checkpoints_without_metrics=False
                ),
            ]
        )
        options = ocp.CheckpointManagerOptions(
            preservation_policy=policy, enable_async_checkpointing=False, create=True
        )
        self.manager = ocp.CheckpointManager(self.directory, options=options)

    def __enter__(self) -> Checkpoints:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def latest_step(self) -> int | None:
        """The newest checkpoint's step, or None when there is none."""
        return self.manager.latest_step()

    def all_steps(self) -> list[int]:
        """Every checkpoint's step, ascending."""
        return sorted(self.manager.all_steps())

    def save(self, step: int, state: Any, meta: dict, val_loss: float | None = None) -> None:
        """Write the checkpoint for `step`, with the checksum of every array, and wait until it is
        complete on disk."""
        metrics = None if val_loss is None else {"val_loss": float(val_loss)}
        meta = {**meta, "checksums": checksums(state)}
        self.manager.save(
            step,
            args=ocp.args.Composite(state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)),
            metrics=metrics,
            force=True,
        )
        self.manager.wait_until_finished()

    def restore(self, abstract_state: Any, model_config: ModelConfig, step: int | None = None) -> tuple[Any, dict]:
        """Restore (state, meta) at `step` (default: the latest) onto the structure, dtypes and
        shardings of `abstract_state`. Refuses a checkpoint made for a different model
        (CheckpointError) and one whose arrays are unreadable or fail their checksums
        (CorruptCheckpointError)."""
        step = self.latest_step() if step is None else step
        if step is None:
            raise CheckpointError(f"no checkpoint in {self.directory}")
        where = f"checkpoint {step} in {self.directory}"
        try:
            meta = self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
        except Exception as err:
            raise CorruptCheckpointError(f"{where} is unreadable ({_first_line(err)})", step) from err
        _check_model(meta, model_config, where)
        target = jax.tree.map(ocp.utils.to_shape_dtype_struct, abstract_state)
        try:
            with _quiet_failed_reads():
                restored = self.manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(target)))
        except Exception as err:
            message = f"{where} is corrupt: its arrays cannot be read ({_first_line(err)})"
            raise CorruptCheckpointError(message, step) from err
        state = restored["state"]
        saved = meta.get("checksums")
        if saved is not None:  # checkpoints written before checksums existed are taken as they are
            now = checksums(state)
            bad = [path for path, value in now.items() if saved.get(path) != value]
            if bad:
                more = f" and {len(bad) - 3} more" if len(bad) > 3 else ""
                listing = ", ".join(p.lstrip(".") for p in bad[:3]) + more
                raise CorruptCheckpointError(
                    f"{where} is corrupt: {len(bad)} of its {len(now)} arrays differ from the checksums saved "
                    f"with them ({listing})",
                    step,
                )
        return state, meta

    def newest_intact(
        self, abstract_state: Any, model_config: ModelConfig, before: int
    ) -> tuple[int, Any, dict] | None:
        """(step, state, meta) of the newest checkpoint older than `before` that restores and
        verifies; None when there is none."""
        for step in sorted((s for s in self.all_steps() if s < before), reverse=True):
            try:
                state, meta = self.restore(abstract_state, model_config, step)
            except CorruptCheckpointError:
                continue
            return step, state, meta
        return None

    def set_aside(self, steps: list[int], destination: str | Path) -> list[Path]:
        """Move the checkpoints of `steps` into `destination` (kept for inspection, never
        deleted), so that the run carries on from the ones left."""
        destination = Path(destination)
        destination.mkdir(parents=True, exist_ok=True)
        moved = []
        for step in steps:
            target = destination / str(step)
            suffix = 1
            while target.exists():
                target, suffix = destination / f"{step}.{suffix}", suffix + 1
            shutil.move(str(self.directory / str(step)), str(target))
            moved.append(target)
        self.manager.reload()
        return moved

    def close(self) -> None:
        """Finish pending writes and release orbax's resources."""
        self.manager.close()


def _check_model(meta: dict, model_config: ModelConfig, where: str) -> None:
    # A field added since the checkpoint was saved takes its default (the model it was saved from),
    # then fills in as ModelConfig fills it (n_kv_heads = n_heads).
    saved = {**{f.name: f.default for f in dataclasses.fields(ModelConfig)}, **meta.get("model_config", {})}
    with contextlib.suppress(ValueError):  # else compared as saved: the differences name what changed
        saved = ModelConfig.from_dict(saved).to_dict()
    wanted = model_config.to_dict()
    differences = {k: (saved.get(k), v) for k, v in wanted.items() if k not in RUNTIME_FIELDS and saved.get(k) != v}
    if differences:
        listing = ", ".join(f"{k}: saved {a!r} vs now {b!r}" for k, (a, b) in sorted(differences.items()))
        raise CheckpointError(
            f"{where} was made for a different model ({listing}): use the saved config, or a new run directory"
        )


def _first_line(err: BaseException) -> str:
    """The root cause's first line, without TensorStore's spec dump: what to show a user."""
    while err.__cause__ is not None:
        err = err.__cause__
    text = str(err).split(". See full TensorStore details")[0].strip().splitlines()
    line = text[0] if text else ""
    return f"{type(err).__name__}: {line[:300]}"


@contextlib.contextmanager
def _quiet_failed_reads() -> Iterator[None]:
    """Orbax reads the arrays in concurrent tasks. When one read fails, it raises that error, and
    the other tasks' failures are reported when they are garbage-collected, as dozens of
    'Task exception was never retrieved' and 'Exception ignored in' tracebacks. Those repeat the
    error that is raised; collect them here, silently."""
    asyncio_log = logging.getLogger("asyncio")
    disabled, hook = asyncio_log.disabled, sys.unraisablehook
    asyncio_log.disabled, sys.unraisablehook = True, lambda _unraisable: None
    try:
        yield
    finally:
        gc.collect()
        asyncio_log.disabled, sys.unraisablehook = disabled, hook
