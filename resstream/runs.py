"""A trained run directory (made by train.py): its config and its model at a checkpoint; and any
model a command takes, a run or a Hugging Face model directory."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import jax
from flax import nnx
from ml_collections import ConfigDict

from resstream.checkpoint import CheckpointError, Checkpoints, CorruptCheckpointError
from resstream.config import ConfigError, base_config, model_config, optimizer_config
from resstream.data import Tokenizer
from resstream.model import Transformer
from resstream.tokenizer import load_tokenizer
from resstream.train import init_state, make_optimizer


def run_config(run_dir: str | Path) -> dict[str, Any]:
    """The run's config.json as a dict, or a ValueError saying why there is none."""
    try:
        return json.loads((Path(run_dir) / "config.json").read_text())
    except FileNotFoundError as err:
        raise ValueError(f"{run_dir} is not a run directory (no config.json): train one with python train.py") from err


def load_run(run_dir: str | Path, step: int | None = None) -> tuple[Transformer, Tokenizer, ConfigDict]:
    """(model, tokenizer, config) of a run directory made by train.py: the model holds the run's
    checkpoint at `step` (default: the latest); the tokenizer is the run's own (its tokenizer.json, a
    `BPETokenizer`, or a `ByteTokenizer` for a byte-level run). Raises CheckpointError when `run_dir` is
    not a run, its checkpoint cannot be used (a corrupt checkpoint's error names the newest intact
    one) or its tokenizer.json cannot be read."""
    config_file = Path(run_dir) / "config.json"
    if not config_file.is_file():
        raise CheckpointError(f"{run_dir} is not a run directory (no config.json): train one with python train.py")
    try:
        config = ConfigDict(json.loads(config_file.read_text()))
    except ValueError as err:
        raise CheckpointError(f"{config_file} is not valid JSON ({err}): the run's config is damaged") from err
    cfg = model_config(config)
    optimizer = make_optimizer(optimizer_config(config))
    # Shapes only: the checkpoint supplies every value, so nothing is initialised (or compiled) here.
    graphdef, abstract = nnx.eval_shape(lambda: init_state(Transformer(cfg, rngs=nnx.Rngs(0)), optimizer, 0))
    # onto this process's first device, whatever mesh or hosts the run was saved from
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=device), abstract)
    with Checkpoints(Path(run_dir) / "checkpoints") as checkpoints:
        try:
            state, _ = checkpoints.restore(abstract, cfg, step)
        except CorruptCheckpointError as err:
            intact = checkpoints.newest_intact(abstract, cfg, before=err.step)
            if intact is None:
                raise
            raise CorruptCheckpointError(
                f"{err}. The newest intact checkpoint is step {intact[0]}: load it with --step {intact[0]} "
                f"(load_run(run_dir, step={intact[0]}))",
                err.step,
            ) from err
    try:
        tokenizer = load_tokenizer(run_dir)
    except ConfigError as err:
        raise CheckpointError(f"the run's tokenizer cannot be loaded: {err}") from err
    return nnx.merge(graphdef, state.params), tokenizer, config


def is_hf_dir(path: str | Path) -> bool:
    """Whether `path` holds a Hugging Face model (a config.json with a `model_type`), not a run."""
    try:
        return "model_type" in json.loads((Path(path) / "config.json").read_text())
    except (OSError, ValueError):
        return False


def load_model(path: str | Path, step: int | None = None, dtype: str = "float32") -> tuple[Any, Any, Any]:
    """(model, tokenizer, run config) of a run directory, or of a Hugging Face model directory (loaded
    in `dtype`, with the default run config: its data is the built-in corpus)."""
    if not is_hf_dir(path):
        return load_run(path, step)
    from resstream import hf

    if step is not None:
        raise ConfigError(f"--step {step}: {path} is a Hugging Face model directory, which holds one checkpoint")
    try:
        model, tokenizer = hf.load(path, dtype=dtype)
    except hf.HFError as err:
        raise ConfigError(str(err)) from err
    config = base_config()
    config.model.update(model.cfg.to_dict())
    return model, tokenizer, config
