"""A training run: data, the jitted step, logging, evaluation, checkpoints, and the end-of-run
report. `run(config, run_dir)` resumes from the run directory's latest checkpoint when there is one.
"""

from __future__ import annotations

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
from resstream.checkpoint import Checkpoints
from resstream.config import ConfigError, ModelConfig
from resstream.data import ByteTokenizer, Sampler, SamplerState, eval_batches, tokenized_corpus
from resstream.model import Transformer
from resstream.sampling import generate
from resstream.sharding import BATCH_AXES, MeshConfig, make_mesh, shard, sharded_train_step, state_shardings
from resstream.telemetry import MetricsLog, plot_run
from resstream.train import OptimizerConfig, eval_loss, init_state, learning_rate_schedule, make_optimizer


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
    """Train (or resume) per `config` (see configs/default.py); returns a summary."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    cfg, opt_cfg, tc = model_config(config), optimizer_config(config), config.train
    seq_len = cfg.n_ctx
    data = config.data
    train_tokens, val_tokens = split_tokens(config, "train"), split_tokens(config, "validation")
    sampler = Sampler(train_tokens, seq_len, tc.batch_size, tc.seed, name=f"the train split of {data.source}")
    mesh = make_mesh(MeshConfig(**config.mesh))
    rows, to_global = _batch_split(mesh, tc.batch_size)
    val_batches = [to_global(b[rows]) for b in eval_batches(val_tokens, seq_len, tc.batch_size, tc.eval_batches)]

    optimizer = make_optimizer(opt_cfg)
    graphdef, state = init_state(Transformer(cfg, rngs=nnx.Rngs(tc.seed)), optimizer, tc.seed)
    shardings = state_shardings(state, mesh)
    state = shard(state, shardings)  # before a restore, so that it restores onto the mesh
    step_fn = sharded_train_step(mesh, shardings, graphdef, optimizer, tc.telemetry)
    checkpoints = Checkpoints(run_dir / "checkpoints", keep_last=tc.keep_last)
    lead = jax.process_index() == 0  # one host writes logs and reports; all write checkpoints
    log = MetricsLog(run_dir, tensorboard=tc.tensorboard) if lead else _NoLog()
    if lead:
        (run_dir / "config.json").write_text(json.dumps(config.to_dict(), indent=2, default=str))

    if checkpoints.latest_step() is not None:
        state, meta = checkpoints.restore(state, cfg)
        sampler.state = SamplerState(**meta["sampler"])
        log.truncate_after(int(state.step))
        print(f"resumed from step {int(state.step)} of {run_dir}")
    start = int(state.step)
    schedule = learning_rate_schedule(opt_cfg)
    tokens_per_step = tc.grad_accum * tc.batch_size * seq_len

    def meta() -> dict:
        return {"model_config": cfg.to_dict(), "sampler": dataclasses.asdict(sampler.state), "step": int(state.step)}

    def validate() -> float:
        return float(np.mean([float(eval_loss(state.params, b, graphdef=graphdef)) for b in val_batches]))

    status, val = "completed", None
    progress = tqdm(
        range(start, tc.steps),
        initial=start,
        total=tc.steps,
        desc="train",
        unit="step",
        disable=not tc.progress,
        dynamic_ncols=True,
    )
    with _StopOnSignal() as stop:
        timer = time.perf_counter()
        for step in progress:
            batch = np.stack([sampler.next_batch(rows) for _ in range(tc.grad_accum)])
            if step == tc.debug_nan_step and rows.start == 0:  # a corrupt batch: an out-of-vocabulary id
                batch[0, 0, 0] = cfg.vocab_size  # gives NaN under jit
            state, metrics = step_fn(state, to_global(batch, accum=True))
            if not bool(metrics["finite"]):
                _diverged(step + 1, metrics, run_dir)
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
                val = validate()
                record = {"step": done, **record, "val_loss": val}
            if record:
                log.write(record)
            if done % tc.checkpoint_every == 0 or done == tc.steps or stop.signal is not None:
                checkpoints.save(done, state, meta(), val_loss=record.get("val_loss"))
            if stop.signal is not None:
                status = f"stopped by signal {signal.Signals(stop.signal).name} after step {done}"
                break
    progress.close()
    log.close()
    checkpoints.close()
    summary = {"status": status, "step": int(state.step), "val_loss": val, "hosts": jax.process_count()}
    if status == "completed" and jax.process_count() == 1:  # samples and report: single-host runs
        summary.update(_finish(config, cfg, graphdef, state, val_batches, run_dir, val))
    if lead:
        (run_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary


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
