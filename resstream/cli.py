"""Command line: `python train.py --config configs/NAME.py [--config.section.field=value ...]`
and `python -m resstream sample RUN_DIR [--prompt ...]`."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

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
        try:
            summary = run(config, run_dir_flag.value or config.run_dir)
        except (ConfigError, DataError, CheckpointError, DivergenceError) as err:
            print(f"error: {err}", file=sys.stderr)
            sys.exit(1)
        print(json.dumps(summary, indent=2))

    app.run(main)


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
    from flax import nnx

    from resstream.checkpoint import CheckpointError, Checkpoints
    from resstream.data import ByteTokenizer
    from resstream.loop import model_config, optimizer_config
    from resstream.model import Transformer
    from resstream.sampling import generate
    from resstream.train import init_state, make_optimizer

    config_file = Path(args.run_dir) / "config.json"
    if not config_file.exists():
        sys.exit(f"error: {args.run_dir} is not a run directory (no config.json); train one with python train.py")
    config = ConfigDict(json.loads(config_file.read_text()))
    cfg = model_config(config)
    model = Transformer(cfg, rngs=nnx.Rngs(0))
    _, abstract = init_state(model, make_optimizer(optimizer_config(config)), 0)
    try:
        state, _ = Checkpoints(Path(args.run_dir) / "checkpoints").restore(abstract, cfg)
    except CheckpointError as err:
        sys.exit(f"error: {err}")
    nnx.update(model, state.params)
    tokenizer = ByteTokenizer()
    prompt = np.repeat(tokenizer.encode(args.prompt)[None], args.num_samples, axis=0)
    out = generate(model, prompt, args.tokens, temperature=args.temperature, top_k=args.top_k, seed=args.seed)
    for row in out:
        print(tokenizer.decode(row))
        print("-" * 40)


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["sample"]:
        sample_main(argv[1:])
    else:
        sys.exit(
            "usage: python -m resstream sample RUN_DIR [--prompt TEXT] [--temperature T] [--top_k K]\n"
            "       (training: python train.py --config configs/NAME.py)"
        )
