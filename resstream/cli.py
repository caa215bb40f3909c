"""Command line: `python train.py --config configs/NAME.py [--config.section.field=value ...]`,
`python -m resstream sample RUN_DIR [--prompt ...]` and
`python -m resstream ablate --checkpoint RUN_DIR [--granularity ...] [--deletion] [--patch]`."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from ml_collections import ConfigDict, config_dict

from resstream.config import ConfigError, ModelConfig

DEFAULT_CONFIG = Path(__file__).resolve().parent.parent / "configs" / "default.py"


def base_config() -> ConfigDict:
    """Every field a run reads, with defaults; the presets in configs/ change what they need."""
    model = ModelConfig().to_dict()
    model["d_head"] = config_dict.placeholder(int)
    model["d_mlp"] = config_dict.placeholder(int)
    return ConfigDict(
        {
            "run_dir": "runs/default",
            # devices: data x fsdp x tensor (-1: the rest); see resstream/sharding.py
            "mesh": {"data": -1, "fsdp": 1, "tensor": 1},
            # join a multi-host job (TPU pod, SLURM, or JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES /
            # JAX_PROCESS_ID in the environment) with jax.distributed.initialize before anything else
            "distributed": False,
            "model": model,
            "optimizer": {
                "learning_rate": 1e-3,
                "warmup_steps": 100,
                "min_lr_ratio": 0.1,
                "weight_decay": 0.1,
                "b1": 0.9,
                "b2": 0.95,
                "grad_clip": 1.0,
            },
            "data": {
                "source": "stdlib",
                "text_column": "text",
                "validation_fraction": 0.05,
                "cache_dir": "runs/.token_cache",
            },
            "train": {
                "steps": 1000,
                "batch_size": 16,
                "grad_accum": 1,
                "seed": 0,
                "log_every": 10,
                "eval_every": 200,
                "eval_batches": 8,
                "checkpoint_every": 200,
                "keep_last": 3,
                "telemetry": True,
                "tensorboard": True,
                "progress": True,
                "sample_tokens": 200,
                "debug_nan_step": -1,
            },
        }
    )


def train_main() -> None:
    from absl import app, flags
    from ml_collections import config_flags

    config_flag = config_flags.DEFINE_config_file(
        "config", str(DEFAULT_CONFIG), "a config file in configs/", lock_config=True
    )
    run_dir_flag = flags.DEFINE_string(
        "run_dir", None, "where checkpoints, logs and plots go (default: config.run_dir)"
    )

    def main(argv: list[str]) -> None:
        from absl import logging

        logging.set_verbosity(logging.WARNING)  # absl's INFO lines (backends, fonts) are noise here
        if len(argv) > 1:
            raise app.UsageError(f"unexpected arguments {argv[1:]}: overrides look like --config.train.steps=100")
        from resstream.checkpoint import CheckpointError
        from resstream.data import DataError
        from resstream.loop import DivergenceError, run

        config = config_flag.value
        if config.distributed:
            _join_hosts()
        try:
            summary = run(config, run_dir_flag.value or config.run_dir)
        except (ConfigError, DataError, CheckpointError, DivergenceError) as err:
            print(f"error: {err}", file=sys.stderr)
            sys.exit(1)
        print(json.dumps(summary, indent=2))

    app.run(main)


def _join_hosts() -> None:
    """jax.distributed.initialize from the environment: explicit JAX_* variables when set, else
    JAX's own detection (TPU pods, SLURM, Open MPI)."""
    import os

    import jax

    env = os.environ
    if "JAX_COORDINATOR_ADDRESS" in env:
        jax.distributed.initialize(
            coordinator_address=env["JAX_COORDINATOR_ADDRESS"],
            num_processes=int(env["JAX_NUM_PROCESSES"]),
            process_id=int(env["JAX_PROCESS_ID"]),
        )
    else:
        jax.distributed.initialize()


def load_run(run_dir: str | Path) -> tuple[ConfigDict, Any]:
    """(config, model with the run's latest checkpoint) of a run directory; exits with a clear
    message when it is not one or its checkpoint cannot be restored."""
    from flax import nnx

    from resstream.checkpoint import CheckpointError, Checkpoints
    from resstream.loop import model_config, optimizer_config
    from resstream.model import Transformer
    from resstream.train import init_state, make_optimizer

    config_file = Path(run_dir) / "config.json"
    if not config_file.exists():
        sys.exit(f"error: {run_dir} is not a run directory (no config.json); train one with python train.py")
    config = ConfigDict(json.loads(config_file.read_text()))
    cfg = model_config(config)
    model = Transformer(cfg, rngs=nnx.Rngs(0))
    _, abstract = init_state(model, make_optimizer(optimizer_config(config)), 0)
    try:
        state, _ = Checkpoints(Path(run_dir) / "checkpoints").restore(abstract, cfg)
    except CheckpointError as err:
        sys.exit(f"error: {err}")
    nnx.update(model, state.params)
    return config, model


def sample_main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(prog="python -m resstream sample", description="sample from a trained run")
    parser.add_argument("run_dir")
    parser.add_argument("--prompt", default="def ")
    parser.add_argument("--tokens", type=int, default=200)
    parser.add_argument("--temperature", type=float, default=0.8, help="0 for greedy")
    parser.add_argument("--top_k", type=int, default=None)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--num_samples", type=int, default=1)
    args = parser.parse_args(argv)

    import numpy as np

    from resstream.data import ByteTokenizer
    from resstream.sampling import generate

    _, model = load_run(args.run_dir)
    tokenizer = ByteTokenizer()
    prompt = np.repeat(tokenizer.encode(args.prompt)[None], args.num_samples, axis=0)
    out = generate(model, prompt, args.tokens, temperature=args.temperature, top_k=args.top_k, seed=args.seed)
    for row in out:
        print(tokenizer.decode(row))
        print("-" * 40)


def _validation_batches(config: ConfigDict, seq: int, batch_size: int, n_batches: int) -> list[Any]:
    """The run's own validation split, as [batch, seq] token arrays."""
    from resstream.data import eval_batches
    from resstream.loop import split_tokens

    tokens = split_tokens(config, "validation")
    return [b[:, :seq] for b in eval_batches(tokens, seq, batch_size, n_batches)]


def ablate_main(argv: list[str]) -> None:
    from resstream import ablation as A  # noqa: N812
    from resstream import study_report

    parser = argparse.ArgumentParser(
        prog="python -m resstream ablate",
        description="ablation studies of a trained run on its validation data: a sweep of loss deltas (total "
        "and direct effect) by component, optionally layer-deletion curves and activation patching; writes "
        "CSV, JSON and PNG files",
    )
    add = parser.add_argument
    add("--checkpoint", required=True, metavar="RUN_DIR", help="a run directory made by train.py")
    add("--granularity", choices=A.GRANULARITIES, default="sublayers")
    add("--method", choices=A.METHODS, default="zero")
    add("--batch_size", type=int, default=16)
    add("--seq", type=int, default=None, help="tokens per sequence (default: the model's context)")
    add("--mean_batches", type=int, default=8, help="validation batches the mean is taken over")
    add("--deletion", action="store_true", help="also delete k random layers, for every k")
    add("--draws", type=int, default=16, help="random draws of layers per k")
    add("--compare", metavar="RUN_DIR", help="a second run whose deletion curve is drawn alongside")
    add("--patch", action="store_true", help="also patch --clean into --corrupted at every (layer, position)")
    add("--clean", default="def f(x):\n    return ")
    add("--corrupted", default="def f(y):\n    return ")
    add("--answer", default="x", help="the clean prompt's next token (one byte)")
    add("--wrong", default="y", help="the corrupted prompt's next token (one byte)")
    add("--out", default=None, help="output directory (default: RUN_DIR/ablation)")
    args = parser.parse_args(argv)

    config, model = load_run(args.checkpoint)
    seq = min(args.seq or model.cfg.n_ctx, model.cfg.n_ctx)
    out = Path(args.out or Path(args.checkpoint) / "ablation")
    out.mkdir(parents=True, exist_ok=True)
    batches = _validation_batches(config, seq, args.batch_size, max(args.mean_batches, 2))
    tokens = batches[0]
    reference = None
    if args.method == "mean":
        reference = A.mean_writes(model, batches[: args.mean_batches])
    elif args.method == "resample":
        reference = batches[1]
    try:
        table = A.ablation_sweep(model, tokens, args.granularity, method=args.method, reference=reference)
        meta = {"run": str(args.checkpoint), "method": args.method, "tokens": list(tokens.shape)}
        study_report.write_table(table.rows(), out / "sweep", {**meta, "baseline_loss": float(table.baseline)})
        study_report.plot_sweep(table, out / "sweep.png")
        print(table)
        if args.deletion:
            _deletion(model, tokens, args, out)
        if args.patch:
            _patch(model, args, out)
    except A.AblationError as err:
        sys.exit(f"error: {err}")
    print(f"\nwrote {out}/")


def _deletion(model: Any, tokens: Any, args: argparse.Namespace, out: Path) -> None:
    from resstream import study_report
    from resstream.ablation import deletion_curve

    models = {Path(args.checkpoint).name: model}
    if args.compare:
        models[Path(args.compare).name] = load_run(args.compare)[1]
    curves = {}
    for name, m in models.items():
        curve = curves[name] = deletion_curve(m, tokens[:, : m.cfg.n_ctx], draws=args.draws)
        by_k = {k: float(v.mean()) for k, v in curve.by_k().items()}
        meta = {"run": name, "baseline_loss": float(curve.baseline), "mean_loss_by_k": by_k}
        study_report.write_table(curve.rows(), out / f"deletion_{name}", meta)
        print(f"\n{name}: {curve}")
    study_report.plot_deletion(curves, out / "deletion.png")


def _patch(model: Any, args: argparse.Namespace, out: Path) -> None:
    import numpy as np

    from resstream import patching, study_report
    from resstream.ablation import AblationError
    from resstream.data import ByteTokenizer

    tokenizer = ByteTokenizer()
    clean, corrupted = tokenizer.encode(args.clean)[None], tokenizer.encode(args.corrupted)[None]
    answer, wrong = tokenizer.encode(args.answer), tokenizer.encode(args.wrong)
    if len(answer) != 1 or len(wrong) != 1:
        raise AblationError(f"--answer {args.answer!r} and --wrong {args.wrong!r} must each be one byte (one token)")
    result = patching.patch_resid(model, clean, corrupted, answer[0], wrong[0])
    labels = [tokenizer.decode([t]) for t in clean[0]]
    rows = [
        {
            "layer": layer,
            "position": pos,
            "token": labels[pos],
            "logit_diff": float(result.logit_diff[layer, pos]),
            "recovered": float(result.recovered[layer, pos]),
        }
        for layer in range(model.cfg.n_layers)
        for pos in range(clean.shape[1])
    ]
    meta = {
        "clean": args.clean,
        "corrupted": args.corrupted,
        "answer": args.answer,
        "wrong": args.wrong,
        "clean_diff": float(result.clean_diff),
        "corrupted_diff": float(result.corrupted_diff),
    }
    study_report.write_table(rows, out / "patching", meta)
    study_report.plot_patching(result, [repr(t)[1:-1] for t in labels], out / "patching.png")
    recovered = np.round(np.asarray(result.recovered), 2)
    print(
        f"\npatching: logit diff clean {meta['clean_diff']:.3f}, corrupted {meta['corrupted_diff']:.3f}; "
        f"fraction recovered by layer (rows) and position:\n{recovered}"
    )


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["sample"]:
        sample_main(argv[1:])
    elif argv[:1] == ["ablate"]:
        ablate_main(argv[1:])
    else:
        sys.exit(
            "usage: python -m resstream sample RUN_DIR [--prompt TEXT] [--temperature T] [--top_k K]\n"
            "       python -m resstream ablate --checkpoint RUN_DIR [--granularity G] [--method M] "
            "[--deletion] [--patch]\n"
            "       (training: python train.py --config configs/NAME.py)"
        )
