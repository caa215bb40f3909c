"""A training run: data, the jitted step, logging, evaluation, checkpoints, and the end-of-run
report. `run(config, run_dir)` resumes from the run directory's latest checkpoint when there is one.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import signal
import time
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from tqdm import tqdm

from resstream import analysis
from resstream.checkpoint import Checkpoints, CorruptCheckpointError
from resstream.config import ConfigError, ModelConfig
from resstream.data import ByteTokenizer, Sampler, SamplerState, eval_batches, tokenized_corpus
from resstream.model import Transformer
from resstream.run_lock import RunLock
from resstream.sampling import generate
from resstream.sharding import BATCH_AXES, MeshConfig, make_mesh, shard, sharded_train_step, state_shardings
from resstream.telemetry import MetricsLog, plot_run
from resstream.train import OptimizerConfig, TrainState, eval_loss, init_state, learning_rate_schedule, make_optimizer


class DivergenceError(RuntimeError):
    """The loss or the gradients stopped being finite."""


def model_config(config: Any) -> ModelConfig:
    return ModelConfig.from_dict(dict(config.model))


def optimizer_config(config: Any) -> OptimizerConfig:
    return OptimizerConfig(**{**dict(config.optimizer), "total_steps": config.train.steps})


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


def split_tokens(config: Any, split: str) -> np.ndarray:
    """The tokenized "train" or "validation" split of the run's data (cached; see data.py)."""
    data = config.data
    return tokenized_corpus(
        data.source, split, data.cache_dir, text_column=data.text_column, validation_fraction=data.validation_fraction
    )


def run(config: Any, run_dir: str | Path) -> dict[str, Any]:
    """Train (or resume) per `config` (see configs/default.py); returns a summary.

    Nothing in `run_dir` changes until the run is accepted: a refused resume (another model, a
    corrupt checkpoint, another process training there) leaves the directory as it was."""
    run_dir = Path(run_dir)
    cfg, opt_cfg, tc = model_config(config), optimizer_config(config), config.train
    _check_run(cfg, run_dir, Path(config.data.cache_dir))
    train_tokens, val_tokens = split_tokens(config, "train"), split_tokens(config, "validation")
    sampler = Sampler(train_tokens, cfg.n_ctx, tc.batch_size, tc.seed, name=f"the train split of {config.data.source}")
    mesh = make_mesh(MeshConfig(**config.mesh))
    rows, to_global = _batch_split(mesh, tc.batch_size)
    val_batches = [to_global(b[rows]) for b in eval_batches(val_tokens, cfg.n_ctx, tc.batch_size, tc.eval_batches)]
    lead = jax.process_index() == 0  # one host writes logs and reports; all write checkpoints

    with contextlib.ExitStack() as cleanup:  # closed however the run ends
        run_dir.mkdir(parents=True, exist_ok=True)
        if lead:
            cleanup.enter_context(RunLock(run_dir))
        optimizer = make_optimizer(opt_cfg)
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
            (run_dir / "config.json").write_text(json.dumps(config.to_dict(), indent=2, default=str))
        if meta is not None:
            sampler.state = SamplerState(**meta["sampler"])
            log.truncate_after(int(state.step))
            print(f"resumed from step {int(state.step)} of {run_dir}")
        loop = _Loop(
            config=config,
            cfg=cfg,
            step_fn=sharded_train_step(mesh, shardings, graphdef, optimizer, tc.telemetry),
            graphdef=graphdef,
            sampler=sampler,
            rows=rows,
            to_global=to_global,
            val_batches=val_batches,
            checkpoints=checkpoints,
            log=log,
            run_dir=run_dir,
        )
        state, status, val = loop.train(state)
        summary = {"status": status, "step": int(state.step), "val_loss": val, "hosts": jax.process_count()}
        if status == "completed" and jax.process_count() == 1:  # samples and report: single-host runs
            summary.update(_finish(config, cfg, graphdef, state, val_batches, run_dir, val))
        if lead:
            (run_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary


def _check_run(cfg: ModelConfig, run_dir: Path, cache_dir: Path) -> None:
    """Mistakes that would otherwise surface mid-run, or as a divergence: refused before any work."""
    tokenizer = ByteTokenizer()
    if cfg.vocab_size < tokenizer.vocab_size:
        raise ConfigError(
            f"model.vocab_size={cfg.vocab_size} is smaller than the tokenizer's vocabulary (bytes: "
            f"{tokenizer.vocab_size} tokens), so some token ids of the data would have no embedding: set "
            f"--config.model.vocab_size={tokenizer.vocab_size}"
        )
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


@dataclasses.dataclass
class _Loop:
    """The training loop of an accepted run: steps, logging, evaluation and checkpoints."""

    config: Any
    cfg: ModelConfig
    step_fn: Any
    graphdef: Any
    sampler: Sampler
    rows: slice
    to_global: Any
    val_batches: list
    checkpoints: Checkpoints
    log: Any
    run_dir: Path

    def validate(self, state: TrainState) -> float:
        losses = [float(eval_loss(state.params, b, graphdef=self.graphdef)) for b in self.val_batches]
        return float(np.mean(losses))

    def meta(self, state: TrainState) -> dict[str, Any]:
        return {
            "model_config": self.cfg.to_dict(),
            "sampler": dataclasses.asdict(self.sampler.state),
            "step": int(state.step),
        }

    def train(self, state: TrainState) -> tuple[TrainState, str, float | None]:
        """Steps from state.step to train.steps, or until SIGTERM / SIGINT; (state, status, last
        validation loss)."""
        tc = self.config.train
        start, status, val = int(state.step), "completed", None
        schedule = learning_rate_schedule(optimizer_config(self.config))
        tokens_per_step = tc.grad_accum * tc.batch_size * self.cfg.n_ctx
        progress = tqdm(
            range(start, tc.steps), initial=start, total=tc.steps, desc="train", unit="step",
            disable=not tc.progress, dynamic_ncols=True,
        )  # fmt: skip
        with progress, _StopOnSignal() as stop:
            timer = time.perf_counter()
            for step in progress:
                batch = np.stack([self.sampler.next_batch(self.rows) for _ in range(tc.grad_accum)])
                if step == tc.debug_nan_step and self.rows.start == 0:  # a corrupt batch: an out-of-vocabulary id
                    batch[0, 0, 0] = self.cfg.vocab_size  # gives NaN under jit
                state, metrics = self.step_fn(state, self.to_global(batch, accum=True))
                if not bool(metrics["finite"]):
                    _diverged(step + 1, metrics, self.run_dir)
                done = step + 1
                record: dict[str, Any] = {}
                if done % tc.log_every == 0 or done == tc.steps:
                    elapsed, timer = time.perf_counter() - timer, time.perf_counter()
                    steps_timed = tc.log_every if done % tc.log_every == 0 else done % tc.log_every
                    record = {
                        "step": done,
                        "loss": metrics["loss"],
                        "lr": float(schedule(step)),
                        "tokens_per_s": steps_timed * tokens_per_step / elapsed,
                        **{k: v for k, v in metrics.items() if k.startswith(("layer_", "grad_norm"))},
                    }
                    progress.set_postfix(loss=f"{float(metrics['loss']):.3f}", tok_s=f"{record['tokens_per_s']:.0f}")
                if done % tc.eval_every == 0 or done == tc.steps:
                    val = self.validate(state)
                    record = {"step": done, **record, "val_loss": val}
                if record:
                    self.log.write(record)
                if done % tc.checkpoint_every == 0 or done == tc.steps or stop.signal is not None:
                    self.checkpoints.save(done, state, self.meta(state), val_loss=record.get("val_loss"))
                if stop.signal is not None:
                    status = f"stopped by signal {signal.Signals(stop.signal).name} after step {done}"
                    break
        return state, status, val


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
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

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


def _diverged(step: int, metrics: dict, run_dir: Path) -> None:
    layer_finite = np.isfinite(np.asarray(metrics["layer_grad_norm"]))
    bad_layers = [int(i) for i in np.flatnonzero(~layer_finite)]
    where = f"layers {bad_layers} (first: layer {bad_layers[0]})" if bad_layers else "no layer"
    embed = "" if bool(metrics["embed_grad_finite"]) else "; the embedding/unembedding gradients too"
    raise DivergenceError(
        f"step {step}: loss {float(metrics['loss'])} is not finite; non-finite gradients in {where}{embed}. "
        f"Nothing from this step was applied or saved: the last checkpoint in {run_dir / 'checkpoints'} is "
        "intact. Lower the learning rate, check the data for bad token ids, or raise grad clipping."
    )


def _finish(
    config: Any, cfg: ModelConfig, graphdef: Any, state: Any, val_batches: list, run_dir: Path, val: float | None
) -> dict[str, Any]:
    """Plots, samples and the report: validation loss and per-layer direct logit attribution."""
    plots = [p.name for p in plot_run(run_dir)]
    model = nnx.merge(graphdef, state.params)
    tokenizer = ByteTokenizer()
    prompts = [b"def ", b"class ", b"import "]
    samples = []
    for prompt in prompts:
        out = generate(
            model,
            tokenizer.encode(prompt)[None],
            config.train.sample_tokens,
            temperature=0.8,
            top_k=40,
            seed=config.train.seed,
        )
        samples.append(tokenizer.decode(out[0]))
    (run_dir / "samples.txt").write_text("\n\n----\n\n".join(samples))

    batch = val_batches[0]
    _, cache = model.run_with_cache(batch[:, :-1])
    attrs = analysis.logit_attrs(model, cache, batch[:, 1:])
    per_component = {label: float(jnp.mean(v)) for label, v in attrs}
    per_layer = {
        layer: sum(v for k, v in per_component.items() if k.startswith(f"{layer}_")) for layer in range(cfg.n_layers)
    }
    lines = [
        f"# Run report: {run_dir}",
        "",
        f"validation loss: {val:.4f} nats/token ({val / math.log(2):.4f} bits/token) after {int(state.step)} steps",
        "",
        "## Direct logit attribution to the correct next token (mean over one validation batch)",
        "",
        "| component | attribution |",
        "|---|---|",
        *[f"| {k} | {v:+.4f} |" for k, v in per_component.items()],
        "",
        "| layer (attention + MLP) | attribution |",
        "|---|---|",
        *[f"| {k} | {v:+.4f} |" for k, v in per_layer.items()],
        "",
        f"plots: {', '.join(plots)}; samples: samples.txt",
    ]
    (run_dir / "report.md").write_text("\n".join(lines) + "\n")
    return {"val_loss_bits": val / math.log(2), "direct_logit_attribution_by_layer": per_layer, "plots": plots}
