"""A run config from train.py's command line: a config file (`--config FILE`, default
configs/default.py) and `--config.section.field=value` overrides (ml_collections), with one-line
errors for a missing or broken file, a field that does not exist, a value of the wrong type."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

from ml_collections import ConfigDict

from resstream.config import base_config

DEFAULT_CONFIG = Path(__file__).resolve().parent.parent / "configs" / "default.py"
TRAIN_USAGE = "usage: python train.py [--config FILE] [--run_dir DIR] [--config.SECTION.FIELD=VALUE ...]"


class UsageError(ValueError):
    """A command line that cannot be run as given."""


def parse_train_args(argv: list[str]) -> tuple[ConfigDict, str]:
    """(config, run_dir) from train.py's command line (argv[0] is the program); UsageError for a
    config file that is missing or broken, a field that does not exist, a value of the wrong type."""
    from absl import flags
    from ml_collections import config_flags

    values = flags.FlagValues()
    try:
        config_flag = config_flags.DEFINE_config_file(
            "config", str(DEFAULT_CONFIG), "a config file", flag_values=values, lock_config=True, sys_argv=argv
        )
        run_dir_flag = flags.DEFINE_string("run_dir", None, "where the run is written", flag_values=values)
        rest = values(argv)
        config = config_flag.value
        run_dir = run_dir_flag.value or config.run_dir
    except Exception as err:  # the config file is the user's code: any error in it is theirs to fix
        raise UsageError(_config_problem(err, argv)) from err
    if len(rest) > 1:
        raise UsageError(f"unexpected arguments {rest[1:]}: overrides look like --config.train.steps=100")
    return config, run_dir


def _config_problem(err: Exception, argv: list[str]) -> str:
    """One line saying what is wrong with the config file or an override."""
    from absl import flags

    path = _config_path(argv)
    if isinstance(err, SyntaxError):
        return f"config file {err.filename} line {err.lineno}: {err.msg}"
    if isinstance(err, OSError) and not Path(path).is_file():
        return f"config file {path} not found: pass an existing file, such as configs/default.py"
    if isinstance(err, flags.Error):
        return str(err)
    if isinstance(err, AttributeError | KeyError) and len(argv) > 1:  # an override naming no field?
        unknown = _unknown_override(argv, path)
        if unknown:
            return unknown
    lines = str(err).strip().splitlines()
    return f"config file {path}: {type(err).__name__}: {lines[0] if lines else ''}"


def _unknown_override(argv: list[str], path: str) -> str | None:
    """The first --config.a.b=... override whose field the config file does not have."""
    import difflib

    try:
        config, _ = parse_train_args([argv[0], f"--config={path}"])
    except UsageError:
        return None
    for arg in argv[1:]:
        if not arg.startswith("--config."):
            continue
        node: Any = config.to_dict()
        keys = arg.split("=", 1)[0].removeprefix("--config.").split(".")
        for depth, key in enumerate(keys):
            if not isinstance(node, dict) or key not in node:
                where = ".".join(keys[:depth]) or "the config"
                close = difflib.get_close_matches(key, list(node) if isinstance(node, dict) else [], n=1)
                hint = f' (did you mean "{close[0]}"?)' if close else ""
                return f"{arg.split('=', 1)[0]}: {where} has no field {key!r} in {path}{hint}"
            node = node[key]
    return None


def _config_path(argv: list[str]) -> str:
    for i, arg in enumerate(argv):
        if arg.startswith("--config="):
            return arg.split("=", 1)[1]
        if arg == "--config" and i + 1 < len(argv):
            return argv[i + 1]
    return str(DEFAULT_CONFIG)


def train_help(argv: list[str]) -> str:
    """train.py --help: the flags and every config field with its value in the chosen file."""
    path = _config_path(argv)
    try:
        config, _ = parse_train_args([argv[0], f"--config={path}"])
        source = path
    except UsageError as err:
        config, source = base_config(), f"the built-in defaults ({err})"
    flat: list[str] = []

    def walk(prefix: str, node: Any) -> None:
        for key, value in node.items():
            if isinstance(value, dict):
                walk(f"{prefix}{key}.", value)
            else:
                flat.append(f"  --config.{prefix}{key}={value}")

    walk("", config.to_dict())
    doc = (sys.modules["__main__"].__doc__ or "").strip() if argv[0].endswith("train.py") else ""
    return "\n".join(
        [
            TRAIN_USAGE,
            *([f"\n{doc}"] if doc else []),
            "",
            "flags:",
            "  --config FILE   a config file (default: configs/default.py); presets are in configs/",
            "  --run_dir DIR   where checkpoints, logs and plots go (default: the config's run_dir)",
            "",
            f"config fields, with their values in {source}:",
            *flat,
        ]
    )
