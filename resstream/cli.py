"""Command line: `python train.py --config configs/NAME.py [--config.section.field=value ...]`,
`python -m resstream sample RUN_DIR [--prompt ...]`,
`python -m resstream ablate --checkpoint RUN_DIR [--granularity ...] [--deletion] [--patch]`,
`python -m resstream analyse MODEL --prompt TEXT` and
`python -m resstream study NAME [--config.field=value ...]`. Wherever a command takes a model (RUN_DIR,
MODEL), a Hugging Face model directory (GPT-2, GPT-NeoX, Llama, Mistral, Qwen2) works too."""

from __future__ import annotations

import argparse
import json
import secrets
import sys
from pathlib import Path
from typing import Any

from resstream.config import ConfigError
from resstream.config_file import TRAIN_USAGE, UsageError, parse_train_args, train_help
from resstream.runs import is_hf_dir, load_model, run_config


def train_main(argv: list[str] | None = None) -> None:
    """`python train.py ...`: train, or resume, one run; every mistake ends in one `error:` line."""
    argv = list(sys.argv if argv is None else argv)  # argv[0] is the program
    if {"-h", "--help", "--helpfull"} & set(argv[1:]):
        print(train_help(argv))
        return
    try:
        config, run_dir = parse_train_args(argv)
    except UsageError as err:
        print(f"error: {err}\n{TRAIN_USAGE}  (--help lists every field)", file=sys.stderr)
        sys.exit(2)
    show_notes()
    from resstream.checkpoint import CheckpointError
    from resstream.data import DataError
    from resstream.loop import DivergenceError, run
    from resstream.run_lock import RunLockedError

    if config.distributed:
        _join_hosts()
    try:
        summary = run(config, run_dir)
    except (ConfigError, DataError, CheckpointError, DivergenceError, RunLockedError) as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(1)
    print(json.dumps(summary, indent=2))


def show_notes() -> None:
    """Print the library's notes (logger "resstream": how the data was split, ...) as plain lines,
    and quiet absl's INFO lines (orbax logs every save)."""
    import logging

    logger = logging.getLogger("resstream")
    if not logger.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("note: %(message)s"))
        logger.addHandler(handler)
        logger.propagate = False
    logging.getLogger("absl").setLevel(logging.WARNING)


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


def sample_main(argv: list[str]) -> None:
    """`python -m resstream sample RUN_DIR ...`: continue a prompt with a trained run."""
    from resstream.sampling import check_sampling

    parser = argparse.ArgumentParser(
        prog="python -m resstream sample", description="sample from a trained run or a Hugging Face model directory"
    )
    parser.add_argument("run_dir", metavar="MODEL", help="a run directory, or a Hugging Face model directory")
    parser.add_argument("--prompt", default="def ")
    parser.add_argument("--tokens", type=int, default=200, help="tokens to generate")
    parser.add_argument("--temperature", type=float, default=0.8, help="0 for greedy")
    parser.add_argument("--top_k", type=int, default=None, help="sample among the k likeliest tokens")
    parser.add_argument("--seed", type=int, default=None, help="the sampling seed (default: a fresh one, printed)")
    parser.add_argument("--num_samples", type=int, default=1)
    parser.add_argument("--step", type=int, default=None, help="the checkpoint to load (default: the latest)")
    args = parser.parse_args(argv)
    if not args.prompt:
        parser.error("--prompt is empty: give at least one character for the model to continue")
    if args.num_samples < 1:
        parser.error(f"--num_samples must be at least 1, got {args.num_samples}")
    try:
        if is_hf_dir(args.run_dir):
            vocab_size = json.loads((Path(args.run_dir) / "config.json").read_text()).get("vocab_size", 1 << 31)
        else:
            vocab_size = run_config(args.run_dir)["model"]["vocab_size"]
        check_sampling(args.tokens, args.temperature, args.top_k, vocab_size)
    except ValueError as err:
        parser.error(str(err))

    import numpy as np

    from resstream.sampling import generate

    model, tokenizer, _ = load_model(args.run_dir, args.step)
    seed = args.seed if args.seed is not None else secrets.randbelow(1 << 31)
    if args.seed is None:
        print(f"note: seed {seed} (pass --seed {seed} to draw the same samples again)", file=sys.stderr)
    prompt = np.repeat(tokenizer.encode(args.prompt)[None], args.num_samples, axis=0)
    out = generate(model, prompt, args.tokens, temperature=args.temperature, top_k=args.top_k, seed=seed)
    for row in out:
        print(tokenizer.decode(row))
        print("-" * 40)


def _validation_batches(config: Any, tokenizer: Any, seq: int, batch_size: int, n_batches: int) -> list[Any]:
    """The run's own validation split in the run's tokenizer, as [batch, seq] token arrays."""
    from resstream.data import eval_batches, split_tokens

    tokens = split_tokens(config, "validation", tokenizer)
    return [b[:, :seq] for b in eval_batches(tokens, seq, batch_size, n_batches)]


def ablate_main(argv: list[str]) -> None:
    """`python -m resstream ablate --checkpoint RUN_DIR ...`: sweep, deletion curves, patching."""
    from resstream import ablation as A  # noqa: N812
    from resstream import interventions, study_report

    parser = argparse.ArgumentParser(
        prog="python -m resstream ablate",
        description="ablation studies of a trained run on its validation data: a sweep of loss deltas (total "
        "and direct effect) by component, optionally layer-deletion curves and activation patching; writes "
        "CSV, JSON and PNG files",
    )
    add = parser.add_argument
    add("--checkpoint", required=True, metavar="MODEL", help="a run directory, or a Hugging Face model directory")
    add("--granularity", choices=interventions.GRANULARITIES, default="sublayers")
    add("--method", choices=interventions.METHODS, default="zero")
    add("--batch_size", type=int, default=16)
    add("--seq", type=int, default=None, help="tokens per sequence (default: the model's context)")
    add("--mean_batches", type=int, default=8, help="validation batches the mean is taken over")
    add("--deletion", action="store_true", help="also delete k random layers, for every k")
    add("--draws", type=int, default=16, help="random draws of layers per k")
    add("--compare", metavar="RUN_DIR", help="a second run whose deletion curve is drawn alongside")
    add("--patch", action="store_true", help="also patch --clean into --corrupted at every (layer, position)")
    add("--clean", default="def f(x):\n    return ")
    add("--corrupted", default="def f(y):\n    return ")
    add("--answer", default="x", help="the clean prompt's next token (one token of the run's tokenizer)")
    add("--wrong", default="y", help="the corrupted prompt's next token (one token of the run's tokenizer)")
    add("--out", default=None, help="output directory (default: RUN_DIR/ablation)")
    add("--step", type=int, default=None, help="the checkpoint to load (default: the latest)")
    args = parser.parse_args(argv)

    model, tokenizer, config = load_model(args.checkpoint, args.step)
    seq = min(args.seq or model.cfg.n_ctx, model.cfg.n_ctx)
    out = Path(args.out or Path(args.checkpoint) / "ablation")
    out.mkdir(parents=True, exist_ok=True)
    batches = _validation_batches(config, tokenizer, seq, args.batch_size, max(args.mean_batches, 2))
    tokens = batches[0]
    reference = None
    if args.method == "mean":
        reference = interventions.mean_writes(model, batches[: args.mean_batches])
    elif args.method == "resample":
        reference = batches[1]
    table = A.ablation_sweep(model, tokens, args.granularity, method=args.method, reference=reference)
    meta = {"run": str(args.checkpoint), "method": args.method, "tokens": list(tokens.shape)}
    study_report.write_table(table.rows(), out / "sweep", {**meta, "baseline_loss": float(table.baseline)})
    study_report.plot_sweep(table, out / "sweep.png")
    print(table)
    if args.deletion:
        _deletion(model, tokens, args, out)
    if args.patch:
        _patch(model, tokenizer, args, out)
    print(f"\nwrote {out}/")


def _deletion(model: Any, tokens: Any, args: argparse.Namespace, out: Path) -> None:
    from resstream import study_report
    from resstream.ablation import deletion_curve

    models = {Path(args.checkpoint).name: model}
    if args.compare:
        models[Path(args.compare).name] = load_model(args.compare)[0]
    curves = {}
    for name, m in models.items():
        curve = curves[name] = deletion_curve(m, tokens[:, : m.cfg.n_ctx], draws=args.draws)
        by_k = {k: float(v.mean()) for k, v in curve.by_k().items()}
        meta = {"run": name, "baseline_loss": float(curve.baseline), "mean_loss_by_k": by_k}
        study_report.write_table(curve.rows(), out / f"deletion_{name}", meta)
        print(f"\n{name}: {curve}")
    study_report.plot_deletion(curves, out / "deletion.png")


def _patch(model: Any, tokenizer: Any, args: argparse.Namespace, out: Path) -> None:
    """Patch --clean into --corrupted (tokenized by the run's tokenizer); tokens labelled as text."""
    import numpy as np

    from resstream import patching, study_report
    from resstream.interventions import AblationError

    clean, corrupted = tokenizer.encode(args.clean)[None], tokenizer.encode(args.corrupted)[None]
    answer, wrong = tokenizer.encode(args.answer), tokenizer.encode(args.wrong)
    if len(answer) != 1 or len(wrong) != 1:
        pieces = {a: [tokenizer.token_text(t) for t in ids] for a, ids in ((args.answer, answer), (args.wrong, wrong))}
        raise AblationError(
            f"--answer {args.answer!r} and --wrong {args.wrong!r} must each be one token of the run's tokenizer; "
            f"they are {pieces[args.answer]} and {pieces[args.wrong]}"
        )
    result = patching.patch_resid(model, clean, corrupted, answer[0], wrong[0])
    rows = [
        {
            "layer": layer,
            "position": pos,
            "token": tokenizer.token_text(clean[0, pos]),
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
    study_report.plot_patching(result, [tokenizer.token_label(t) for t in clean[0]], out / "patching.png")
    recovered = np.round(np.asarray(result.recovered), 2)
    print(
        f"\npatching: logit diff clean {meta['clean_diff']:.3f}, corrupted {meta['corrupted_diff']:.3f}; "
        f"fraction recovered by layer (rows) and position:\n{recovered}"
    )


def analyse_main(argv: list[str]) -> None:
    """`python -m resstream analyse MODEL --prompt TEXT`: direct logit attribution, logit lens and a
    head sweep for one prompt."""
    from resstream.prompt_analysis import analyse_prompt, write_analysis

    parser = argparse.ArgumentParser(
        prog="python -m resstream analyse",
        description="which components wrote the predicted next token (direct logit attribution), where the "
        "stream first predicts it (logit lens) and which heads the prompt's loss needs (a zero-ablation head "
        "sweep); prints them and writes analysis.json and analysis.png",
    )
    parser.add_argument("model", metavar="MODEL", help="a run directory, or a Hugging Face model directory")
    parser.add_argument("--prompt", default="def add(a, b):\n    return a +")
    parser.add_argument("--top", type=int, default=5, help="next tokens to list")
    parser.add_argument("--dtype", default="float32", help="parameters of a Hugging Face model: float32 or bfloat16")
    parser.add_argument("--out", default=None, help="output directory (default: MODEL/analysis)")
    parser.add_argument("--step", type=int, default=None, help="a run's checkpoint (default: the latest)")
    args = parser.parse_args(argv)
    model, tokenizer, _ = load_model(args.model, args.step, args.dtype)
    result = analyse_prompt(model, tokenizer, args.prompt, top=args.top)
    out = Path(args.out or Path(args.model) / "analysis")
    write_analysis(result, out)
    print(result)
    print(f"\nwrote {out}/")


STUDY_USAGE = "usage: python -m resstream study NAME [--config.FIELD=VALUE ...] (--list: the studies)"


def study_main(argv: list[str]) -> None:
    """`python -m resstream study NAME [--config.x=...]`: train what the study needs, measure, and
    write runs/studies/NAME/ (results.json, results.csv, NAME.png, report.md)."""
    import shlex

    from resstream.studies import STUDIES, study_module
    from resstream.studies.common import run_study

    if not argv or argv[0] in ("-h", "--help", "--list"):
        lines = [STUDY_USAGE, "", "studies:"]
        lines += [f"  {name:18} {' '.join(study_module(name).__doc__.split())}" for name in STUDIES]
        lines += ["", "--config.FIELD=VALUE overrides a field of the study's config; --help after NAME lists them."]
        print("\n".join(lines))
        return
    try:
        module = study_module(argv[0])
    except ValueError as err:
        raise UsageError(f"{err}\n{STUDY_USAGE}") from err
    config = _study_flags(module, argv)
    if config is None:
        return
    _cache_compiles(Path(config.pool_dir) / ".jax_cache")
    run_study(module, config, "python -m resstream study " + shlex.join(argv))


def _cache_compiles(directory: Path) -> None:
    """Keep compiled programs on disk (JAX's persistent compilation cache), unless the user chose a
    cache already: a study's models of one shape (its seeds) then compile once."""
    import jax

    if not jax.config.jax_compilation_cache_dir:
        jax.config.update("jax_compilation_cache_dir", str(directory))
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)


def _study_flags(module: Any, argv: list[str]) -> Any:
    """The study's config with the command line's --config.x=... overrides (None after --help)."""
    from absl import flags
    from ml_collections import config_flags

    config = module.get_config()
    if {"-h", "--help"} & set(argv[1:]):
        print(f"{STUDY_USAGE}\n\n{module.NAME}: {module.CLAIM}\n\nconfig fields:")
        for line in _flat(config.to_dict()):
            print(f"  --config.{line}")
        return None
    values = flags.FlagValues()
    command = ["study", *argv[1:]]
    try:
        flag = config_flags.DEFINE_config_dict("config", config, flag_values=values, sys_argv=command)
        rest = values(command)
    except Exception as err:  # an override naming no field, or a value of the wrong type
        raise UsageError(f"{str(err).splitlines()[0]}\n{STUDY_USAGE}  (NAME --help lists the fields)") from err
    if len(rest) > 1:
        raise UsageError(f"unexpected arguments {rest[1:]}: overrides look like --config.base.train.steps=100")
    return flag.value


def _flat(node: dict, prefix: str = "") -> list[str]:
    out = []
    for key, value in node.items():
        out += _flat(value, f"{prefix}{key}.") if isinstance(value, dict) else [f"{prefix}{key}={value}"]
    return out


USAGE = (
    "usage: python -m resstream sample RUN_DIR [--prompt TEXT] [--temperature T] [--top_k K] [--step N]\n"
    "       python -m resstream ablate --checkpoint RUN_DIR [--granularity G] [--method M] [--deletion] [--patch]\n"
    "       python -m resstream analyse MODEL [--prompt TEXT]\n"
    "       (RUN_DIR or MODEL: a run directory, or a Hugging Face model directory)\n"
    "       python -m resstream study NAME [--config.FIELD=VALUE ...]   (--list: the studies)\n"
    "       (training: python train.py --config configs/NAME.py; each command takes --help)"
)


def main(argv: list[str] | None = None) -> None:
    """`python -m resstream COMMAND ...`; a user's mistake ends in one `error:` line, exit status 1."""
    from resstream.checkpoint import CheckpointError
    from resstream.data import DataError
    from resstream.interventions import AblationError
    from resstream.model import TokenError
    from resstream.studies.common import StudyError

    argv = sys.argv[1:] if argv is None else argv
    commands = {"sample": sample_main, "ablate": ablate_main, "analyse": analyse_main, "study": study_main}
    if argv[:1] in (["-h"], ["--help"]):
        print(USAGE)
        return
    if not argv or argv[0] not in commands:
        sys.exit(f"error: {'no command' if not argv else f'unknown command {argv[0]!r}'}\n{USAGE}")
    show_notes()
    try:
        commands[argv[0]](argv[1:])
    except (AblationError, CheckpointError, ConfigError, DataError, StudyError, TokenError, UsageError) as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(1)
