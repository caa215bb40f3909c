"""Checkpoints with orbax: the whole train state plus what is needed to resume exactly.

Each checkpoint holds the TrainState (parameters, optimizer state, step, RNG) and a JSON record of
the model config, the data sampler's position and the metrics. Orbax writes into a temporary
directory and renames it when complete, so an interrupted save never leaves a checkpoint that looks
whole. Kept: the last `keep_last` and the best by validation loss.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import jax
import orbax.checkpoint as ocp

from resstream.config import RUNTIME_FIELDS, ModelConfig

# orbax logs every save at INFO; a training run's own log says what matters.
logging.getLogger("absl").setLevel(logging.WARNING)


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used: unreadable, or made for another model."""


class Checkpoints:
    """The checkpoints of one run directory."""

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

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def all_steps(self) -> list[int]:
        return list(self.manager.all_steps())

    def save(self, step: int, state: Any, meta: dict, val_loss: float | None = None) -> None:
        """Write the checkpoint for `step` and wait until it is complete on disk."""
        metrics = None if val_loss is None else {"val_loss": float(val_loss)}
        self.manager.save(
            step,
            args=ocp.args.Composite(state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)),
            metrics=metrics,
            force=True,
        )
        self.manager.wait_until_finished()

    def restore(self, abstract_state: Any, model_config: ModelConfig, step: int | None = None) -> tuple[Any, dict]:
        """Restore (state, meta) at `step` (default: the latest) onto the structure, dtypes and
        shardings of `abstract_state`; refuses a checkpoint made for a different model."""
        step = self.latest_step() if step is None else step
        if step is None:
            raise CheckpointError(f"no checkpoint in {self.directory}")
        where = f"checkpoint {step} in {self.directory}"
        try:
            meta = self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
        except Exception as err:
            raise CheckpointError(
                f"{where} is unreadable ({type(err).__name__}: {err}); "
                "delete that step's directory to resume from an earlier one"
            ) from None
        saved = meta.get("model_config", {})
        wanted = model_config.to_dict()
        differences = {k: (saved.get(k), v) for k, v in wanted.items() if k not in RUNTIME_FIELDS and saved.get(k) != v}
        if differences:
            listing = ", ".join(f"{k}: saved {a!r} vs now {b!r}" for k, (a, b) in sorted(differences.items()))
            raise CheckpointError(
                f"{where} was made for a different model ({listing}): use the saved config, or a new run directory"
            )
        target = jax.tree.map(ocp.utils.to_shape_dtype_struct, abstract_state)
        try:
            restored = self.manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(target)))
        except Exception as err:
            raise CheckpointError(
                f"{where} could not be restored ({type(err).__name__}: {err}); "
                "it may be corrupt or from an incompatible version"
            ) from None
        return restored["state"], meta

    def close(self) -> None:
        self.manager.close()
