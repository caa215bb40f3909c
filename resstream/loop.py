"""A training run: data, the compiled step, logging, evaluation and checkpoints (the end-of-run
report is resstream/report.py). `run(config, run_dir)` resumes from the run directory's latest
checkpoint when there is one.

The loop never waits on the device between the steps it logs, evaluates or checkpoints: the steps
thread their "finite so far" flag from one to the next on the device (see `train.optimizer_step`),
and the loop reads it only where it reads the metrics anyway.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jax
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
from tqdm import tqdm

from resstream.checkpoint import Checkpoints, CorruptCheckpointError
from resstream.config import ConfigError, MeshConfig, ModelConfig, model_config, optimizer_config
from resstream.data import Sampler, SamplerState, Tokenizer, eval_batches, split_counts, split_tokens
from resstream.host_memory import reuse_step_buffers
from resstream.model import Transformer
from resstream.report import write_report
from resstream.run_lock import RunLock
from resstream.sharding import BATCH_AXES, make_mesh, shard, state_shardings
from resstream.telemetry import MetricsLog
from resstream.tokenizer import check_vocab, save_to_run, tokenizer_for
from resstream.train import MeshSteps, TrainState, init_state, learning_rate_schedule, make_optimizer, mesh_steps


class DivergenceError(RuntimeError):
    """The loss or the gradients stopped being finite."""


class _StopOnSignal:
    """SIGTERM / SIGINT ask the loop to stop after the current step (and checkpoint)."""

    def __init__(self):
        self.signal: int | None = None

    def __enter__(self) -> _StopOnSignal:
        self.previous = {s: signal.signal(s, self._handle) for s in (signal.SIGTERM, signal.SIGINT)}
        return self

    def _handle(self, signum: int, _frame: Any) -> None:
        self.signal = signum

    def __exit__(self, *exc: Any) -> None:
        for s, handler in self.previous.items():
            signal.signal(s, handler)


@dataclasses.dataclass
class _Data:
    """The run's data on this host: its sampler of training batches, the rows of each batch that are
    this host's, the function that assembles the hosts' rows into one global array, and the
    validation batches (global arrays [batch, seq + 1]), and the factor that turns the validation
    loss (nats per token) into bits per byte."""

    sampler: Sampler
    rows: slice
    to_global: Any
    val_batches: list
    bits_per_byte: float


def _data(config: Any, cfg: ModelConfig, mesh: Any, tokenizer: Tokenizer) -> _Data:
    tc = config.train
    train_tokens, val_tokens = split_tokens(config, "train", tokenizer), split_tokens(config, "validation", tokenizer)
    val_token_count, val_byte_count = split_counts(config, "validation", tokenizer)
    sampler = Sampler(train_tokens, cfg.n_ctx, tc.batch_size, tc.seed, name=f"the train split of {config.data.source}")
    rows, to_global = _batch_split(mesh, tc.batch_size)
    val_batches = [to_global(b[rows]) for b in eval_batches(val_tokens, cfg.n_ctx, tc.batch_size, tc.eval_batches)]
    return _Data(sampler, rows, to_global, val_batches, val_token_count / val_byte_count / math.log(2))


def run(config: Any, run_dir: str | Path, *, report: bool = True) -> dict[str, Any]:
    """Train (or resume) per `config` (see configs/default.py); returns a summary. `report=False`
    skips the finished run's plots, samples and report.md (a study that trains many models).

    Nothing in `run_dir` changes until the run is accepted: a refused resume (another model, a
    corrupt checkpoint, another process training there) leaves the directory as it was."""
    run_dir = Path(run_dir)
    cfg, tc = model_config(config), config.train
    reuse_step_buffers()  # each step's buffers reuse the last one's pages (resstream.host_memory)
    _check_run(cfg, run_dir, Path(config.data.cache_dir), config.data.tokenizer)
    mesh = make_mesh(MeshConfig(**config.mesh))
    tokenizer = tokenizer_for(config, run_dir)  # writes nothing in run_dir: save_to_run does, once accepted
    data = _data(config, cfg, mesh, tokenizer)
    lead = jax.process_index() == 0  # one host writes logs and reports; all write checkpoints

    with contextlib.ExitStack() as cleanup:  # closed however the run ends
        run_dir.mkdir(parents=True, exist_ok=True)
        if lead:
            cleanup.enter_context(RunLock(run_dir))
        optimizer = make_optimizer(optimizer_config(config))
        graphdef, state = init_state(Transformer(cfg, rngs=nnx.Rngs(tc.seed)), optimizer, tc.seed)
        shardings = state_shardings(state, mesh)
        state = shard(state, shardings)  # before a restore, so that it restores onto the mesh
        checkpoints = cleanup.enter_context(Checkpoints(run_dir / "checkpoints", keep_last=tc.keep_last))
        state, meta = _resume(checkpoints, state, cfg, bool(tc.resume_intact), run_dir)
        if int(state.step) >= tc.steps:
            return _already_complete(run_dir, int(state.step), tc.steps)

        # The run is accepted: from here on it writes to run_dir.
        log = MetricsLog(run_dir, tensorboard=tc.tensorboard) if lead else _NoLog()
        cleanup.callback(log.close)
        if lead:
            save_to_run(tokenizer, run_dir)  # before config.json, which names it
            (run_dir / "config.json").write_text(json.dumps(config.to_dict(), indent=2, default=str))
        if meta is not None:
            data.sampler.state = SamplerState(**meta["sampler"])
            log.truncate_after(int(state.step))
            print(f"resumed from step {int(state.step)} of {run_dir}")
        steps = mesh_steps(mesh, shardings, graphdef, optimizer, tc.telemetry)
        loop = _Loop(config, cfg, steps, data, checkpoints, log, run_dir)
        state, status, val = loop.train(state)
        summary = {"status": status, "step": int(state.step), "val_loss": val, "hosts": jax.process_count()}
        bits = None if val is None else val * data.bits_per_byte  # the loss per byte, whatever the tokenizer
        summary.update({} if bits is None else {"val_bits_per_byte": bits})
        if report and status == "completed" and jax.process_count() == 1:  # samples and report: single-host
            model = nnx.merge(graphdef, state.params)
            summary.update(
                write_report(config, cfg, model, int(state.step), data.val_batches, run_dir, val, tokenizer, bits)
            )
        if lead:
            (run_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary


def _check_run(cfg: ModelConfig, run_dir: Path, cache_dir: Path, tokenizer: str) -> None:
    """Mistakes that would otherwise surface mid-run, or as a divergence: refused before any work."""
    check_vocab(tokenizer, cfg.vocab_size)  # and data.tokenizer itself
    for path, what in ((run_dir, "--run_dir"), (cache_dir, "data.cache_dir")):
        if path.exists() and not path.is_dir():
            raise ConfigError(f"{what} {path} is a file, not a directory: name a directory (it is created if missing)")


def _resume(
    checkpoints: Checkpoints, state: TrainState, cfg: ModelConfig, resume_intact: bool, run_dir: Path
) -> tuple[TrainState, dict | None]:
    """(state, meta) of the latest checkpoint, or (state, None) for a new run. A corrupt latest
    checkpoint is refused, naming the newest intact one; with `resume_intact` the corrupt ones are
    moved to run_dir/corrupt_checkpoints/ and the run resumes from that one."""
    if checkpoints.latest_step() is None:
        return state, None
    try:
        return checkpoints.restore(state, cfg)
    except CorruptCheckpointError as err:
        intact = checkpoints.newest_intact(state, cfg, before=err.step)
        if intact is None:
            raise CorruptCheckpointError(
                f"{err}. No earlier checkpoint is intact: train again in a new --run_dir", err.step
            ) from err
        step, intact_state, meta = intact
        newer = [s for s in checkpoints.all_steps() if s > step]
        aside = run_dir / "corrupt_checkpoints"
        if not resume_intact:
            raise CorruptCheckpointError(
                f"{err}. The newest intact checkpoint is step {step}: run the same command with "
                f"--config.train.resume_intact=True to move checkpoints {newer} to {aside}/ and resume from "
                f"step {step}",
                err.step,
            ) from err
        checkpoints.set_aside(newer, aside)
        print(f"checkpoints {newer} are corrupt: moved to {aside}/; resuming from step {step}")
        return intact_state, meta


def _already_complete(run_dir: Path, step: int, steps: int) -> dict[str, Any]:
    """A run asked to train no further than its latest checkpoint: nothing to do, nothing changed."""
    print(
        f"{run_dir} is already complete: its latest checkpoint is step {step} and train.steps={steps}. "
        "To train further, raise --config.train.steps."
    )
    summary_file = run_dir / "summary.json"
    summary = json.loads(summary_file.read_text()) if summary_file.exists() else {}
    return {**summary, "status": "already complete", "step": step}


class _Throughput:
    """Tokens/s of the steps between two log points, counting neither the first step of the run (it
    compiles) nor the time spent evaluating and checkpointing."""

    def __init__(self, tokens_per_step: int):
        self.tokens_per_step, self.steps, self.excluded, self.start = tokens_per_step, 0, 0.0, None

    def stepped(self, metrics: dict) -> None:
        if self.start is None:  # the first step: wait for it (and its compile) to finish
            jax.block_until_ready(metrics["loss"])
            self.start = time.perf_counter()
        else:
            self.steps += 1

    def rate(self, metrics: dict) -> float | None:
        """Tokens/s since the last call (None when no step since the first was timed)."""
        jax.block_until_ready(metrics["loss"])
        now = time.perf_counter()
        elapsed = now - self.start - self.excluded
        rate = self.steps * self.tokens_per_step / elapsed if self.steps else None
        self.start, self.steps, self.excluded = now, 0, 0.0
        return rate

    @contextlib.contextmanager
    def paused(self) -> Iterator[None]:
        """Time not counted: the caller has waited for the device already (the metrics were read)."""
        start = time.perf_counter()
        try:
            yield
        finally:
            self.excluded += time.perf_counter() - start


@dataclasses.dataclass
class _Loop:
    """The training loop of an accepted run: steps, logging, evaluation and checkpoints."""

    config: Any
    cfg: ModelConfig
    steps: MeshSteps
    data: _Data
    checkpoints: Checkpoints
    log: Any
    run_dir: Path

    def validate(self, state: TrainState) -> float:
        return float(np.mean([float(self.steps.evaluate(state.params, b)) for b in self.data.val_batches]))

    def meta(self, state: TrainState) -> dict[str, Any]:
        return {
            "model_config": self.cfg.to_dict(),
            "sampler": dataclasses.asdict(self.data.sampler.state),
            "step": int(state.step),
        }

    def next_batch(self) -> jax.Array:
        """[accum, batch, seq + 1], split over the mesh."""
        micro = [self.data.sampler.next_batch(self.data.rows) for _ in range(self.config.train.grad_accum)]
        return self.data.to_global(np.stack(micro), accum=True)

    def train(self, state: TrainState) -> tuple[TrainState, str, float | None]:
        """Steps from state.step to train.steps, or until SIGTERM / SIGINT; (state, status, last
        validation loss). The device is waited on only at steps that log, evaluate or checkpoint."""
        tc = self.config.train
        start, status, val = int(state.step), "completed", None
        schedule = learning_rate_schedule(optimizer_config(self.config))
        throughput = _Throughput(tc.grad_accum * tc.batch_size * self.cfg.n_ctx)
        # Every step so far was finite: a flag on the device, placed as the steps return it (on the
        # state's mesh), so that the first step compiles the same program as every later one.
        mesh = jax.tree.leaves(state)[0].sharding.mesh
        finite: Any = jax.device_put(True, NamedSharding(mesh, P()))
        unread: list[tuple[int, dict]] = []  # (step, metrics) not yet checked for divergence
        progress = tqdm(
            range(start, tc.steps), initial=start, total=tc.steps, desc="train", unit="step",
            disable=not tc.progress, dynamic_ncols=True,
        )  # fmt: skip
        with progress, _StopOnSignal() as stop:
            for step in progress:
                state, metrics = self.steps.train(state, self.next_batch(), finite)
                finite, done = metrics["finite"], step + 1
                unread.append((done, metrics))
                throughput.stepped(metrics)
                # The signal is read once per step: one arriving after this line stops the next step.
                last, stopping = done == tc.steps, stop.signal is not None
                logs, evaluates = done % tc.log_every == 0 or last, done % tc.eval_every == 0 or last
                saves = done % tc.checkpoint_every == 0 or last or stopping
                if not (logs or evaluates or saves):
                    continue
                _check_finite(unread, self.run_dir)  # the one place the loop waits for the device
                unread = []
                record = self.record(done, metrics, schedule(step), throughput) if logs else {}
                with throughput.paused():
                    if evaluates:
                        val = self.validate(state)
                        bits = val * self.data.bits_per_byte
                        record = {"step": done, **record, "val_loss": val, "val_bits_per_byte": bits}
                    if record:
                        self.log.write(record)
                    if saves:
                        self.checkpoints.save(done, state, self.meta(state), val_loss=record.get("val_loss"))
                if logs:
                    postfix = {"loss": f"{float(metrics['loss']):.3f}"}
                    if record.get("tokens_per_s"):
                        postfix["tok_s"] = f"{record['tokens_per_s']:.0f}"
                    progress.set_postfix(postfix)
                if stopping:
                    status = f"stopped by signal {signal.Signals(stop.signal).name} after step {done}"
                    break
        return state, status, val

    def record(self, done: int, metrics: dict, lr: Any, throughput: _Throughput) -> dict[str, Any]:
        """The metrics log's line for step `done`."""
        rate = throughput.rate(metrics)
        return {
            "step": done,
            "loss": metrics["loss"],
            "lr": float(lr),
            **({"tokens_per_s": rate} if rate is not None else {}),
            **{k: v for k, v in metrics.items() if k.startswith(("layer_", "grad_norm"))},
        }


class _NoLog:
    """The metrics log of a host that does not write one."""

    def write(self, record: dict) -> None:
        pass

    def truncate_after(self, step: int) -> None:
        pass

    def close(self) -> None:
        pass


def _batch_split(mesh: Any, batch_size: int) -> tuple[slice, Any]:
    """This host's rows of every batch, and the function that assembles the hosts' rows
    ([batch_rows, ...] or, with accum=True, [accum, batch_rows, ...]) into one global array split
    over the mesh's data and fsdp axes."""
    ways = mesh.shape["data"] * mesh.shape["fsdp"]
    if batch_size % ways or batch_size % jax.process_count():
        raise ConfigError(
            f"train.batch_size={batch_size} does not split evenly over data x fsdp = {ways} devices and "
            f"{jax.process_count()} hosts: use a multiple of {math.lcm(ways, jax.process_count())}"
        )
    per_host = batch_size // jax.process_count()
    rows = slice(jax.process_index() * per_host, (jax.process_index() + 1) * per_host)

    def to_global(local: np.ndarray, accum: bool = False) -> jax.Array:
        spec = P(None, BATCH_AXES) if accum else P(BATCH_AXES)
        shape = (*local.shape[:1], batch_size, *local.shape[2:]) if accum else (batch_size, *local.shape[1:])
        return jax.make_array_from_process_local_data(NamedSharding(mesh, spec), local, shape)

    return rows, to_global


def _check_finite(unread: list[tuple[int, dict]], run_dir: Path) -> None:
    """DivergenceError naming the first of the `unread` steps that was not finite, if any (the flag
    is sticky: the last step's says whether any was)."""
    if not unread or bool(unread[-1][1]["finite"]):
        return
    step, metrics = next((s, m) for s, m in unread if not bool(m["finite"]))
    layer_finite = np.isfinite(np.asarray(metrics["layer_grad_norm"]))
    bad_layers = [int(i) for i in np.flatnonzero(~layer_finite)]
    where = f"layers {bad_layers} (first: layer {bad_layers[0]})" if bad_layers else "no layer"
    embed = "" if bool(metrics["embed_grad_finite"]) else "; the embedding/unembedding gradients too"
    raise DivergenceError(
        f"step {step}: loss {float(metrics['loss'])} is not finite; non-finite gradients in {where}{embed}. "
        f"Nothing from this step on was applied or saved: the last checkpoint in {run_dir / 'checkpoints'} is "
        "intact. Lower the learning rate, check the data for bad token ids, or raise grad clipping."
    )
