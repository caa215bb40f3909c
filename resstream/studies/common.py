"""What every study shares: its config, the models it trains (kept in a pool of runs keyed by their
config, so a study run twice, or two studies that need the same model, train it once), and the files
it writes: results.json, results.csv, a PNG and report.md.

A study module defines NAME, CLAIM, REFERENCE, `get_config() -> ConfigDict` and
`measure(config, pool) -> Findings`; `run_study` does the rest.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import math
import time
from collections.abc import Sequence
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
from matplotlib.figure import Figure
from ml_collections import ConfigDict

from resstream.config import base_config
from resstream.study_report import write_table

# Fields that change where a run is kept or how it is shown, not what it computes: left out of its key.
_NOT_KEYED = (
    ("run_dir",), ("mesh",), ("data", "cache_dir"), ("train", "progress"), ("train", "tensorboard"),
    ("train", "resume_intact"),
)  # fmt: skip
# Part of every run's key: raise it when a change to the model or the training makes older pool
# runs stale, so that they are trained again rather than silently reused.
POOL_VERSION = 1
# Model fields added after pool version 1 (for loaded checkpoints): left out of the key at their
# defaults, which compute what the models before them computed, so those pool runs stay found.
_LATER_MODEL_FIELDS = (
    "n_kv_heads", "parallel_attn", "qkv_bias", "attn_out_bias", "mlp_bias", "unembed_bias", "sliding_window",
    "rotary_dim", "rope_scaling", "rope_factor", "rope_low_freq_factor", "rope_high_freq_factor",
    "rope_original_n_ctx",
)  # fmt: skip


class StudyError(RuntimeError):
    """A study that cannot go on (a run stopped by a signal, a model it needs diverged)."""


def study_config(**study: Any) -> ConfigDict:
    """A study's config: where it writes (`out_dir`), where trained models are kept (`pool_dir`),
    the seeds, `base` (the run config every model starts from: a small byte-level model on the
    standard-library corpus), and the study's own fields."""
    base = base_config()
    base.model.update(vocab_size=256, n_layers=8, d_model=64, n_heads=4, n_ctx=64)
    base.optimizer.update(learning_rate=2e-3, warmup_steps=50)
    base.train.update(
        steps=600, batch_size=16, log_every=10, eval_every=600, eval_batches=8, checkpoint_every=600, keep_last=1,
        tensorboard=False, telemetry=False, sample_tokens=0,
    )  # fmt: skip
    return ConfigDict({"out_dir": "", "pool_dir": "runs/studies/runs", "seeds": (0,), "base": base, **study})


@dataclasses.dataclass
class Trained:
    """A model a study trained (or found already trained): its run directory, run config and
    summary. `diverged` holds loop.run's DivergenceError message when the run stopped on a
    non-finite loss (its checkpoints hold the last finite step)."""

    label: str
    run_dir: Path
    config: ConfigDict
    summary: dict[str, Any]
    reused: bool = False  # found trained in the pool, not trained by this call

    @property
    def diverged(self) -> str | None:
        return self.summary.get("diverged")

    def log(self) -> list[dict[str, Any]]:
        """The run's metrics.jsonl records."""
        from resstream.telemetry import read_log

        return read_log(self.run_dir)

    def train_loss(self) -> float:
        """Loss of the trained model on the first train.eval_batches batches of the training split
        (the same batches for every model, so models and seeds compare without batch noise); NaN
        when the run diverged."""
        if self.diverged:
            return math.nan
        from resstream.losses import cross_entropy

        model = self.model()
        batches = fixed_batches(self.config, "train", self.config.train.eval_batches)
        return float(np.mean([float(cross_entropy(model(b[:, :-1]), b[:, 1:])) for b in batches]))

    @property
    def val_loss(self) -> float:
        """Validation loss at the end of training (NaN when the run diverged)."""
        value = None if self.diverged else self.summary.get("val_loss")
        return math.nan if value is None else float(value)

    def model(self, step: int | None = None) -> Any:
        """The trained model (at checkpoint `step`, default the latest)."""
        from resstream.runs import load_run

        return load_run(self.run_dir, step)[0]


class Pool:
    """Trains the models a study asks for, each in `pool_dir/LAYERSxWIDTH-KEY` where KEY is a hash
    of its run config: the same config is trained once (whichever study asks for it, under whatever
    label), and an interrupted run resumes."""

    def __init__(self, config: ConfigDict):
        self.base = config.base
        self.dir = Path(config.pool_dir)
        self.trained: list[Trained] = []

    def run_config(self, **changes: dict[str, Any]) -> ConfigDict:
        """The base run config with `changes` ({section: {field: value}}) applied."""
        config = copy.deepcopy(self.base)
        config.unlock()
        for section, values in changes.items():
            config[section].update(values)
        return config

    def train(self, label: str, **changes: dict[str, Any]) -> Trained:
        """Train (or reuse) the model of the base config with `changes` applied."""
        from resstream.loop import DivergenceError, run

        config = self.run_config(**changes)
        run_dir = self.dir / f"{config.model.n_layers}x{config.model.d_model}-{config_key(config)}"
        config.run_dir = str(run_dir)
        done = run_dir / "summary.json"
        diverged = run_dir / "diverged.json"
        print(f"[{len(self.trained) + 1}] {label}: {run_dir}", flush=True)
        reused = True
        if diverged.exists():
            summary = json.loads(diverged.read_text())
            print(f"    diverged when it was trained (delete {run_dir} to train it again)", flush=True)
        elif done.exists() and json.loads(done.read_text()).get("status") == "completed":
            summary = json.loads(done.read_text())
            print("    already trained: reused", flush=True)
        else:
            reused = False
            try:
                summary = run(config, run_dir, report=False)
                if summary["status"] not in ("completed", "already complete"):
                    raise StudyError(f"{label}: {summary['status']}; run the same command again to resume")
            except DivergenceError as err:
                summary = {"status": "diverged", "diverged": str(err)}
                diverged.write_text(json.dumps(summary, indent=2))
                print(f"    diverged: {err}", flush=True)
        trained = Trained(label, run_dir, config, summary, reused)
        self.trained.append(trained)
        return trained


def config_key(config: ConfigDict) -> str:
    """A short hash of what a run computes (its config without the presentation fields)."""
    values = {**config.to_dict(), "pool_version": POOL_VERSION}
    for path in _NOT_KEYED:
        node = values
        for key in path[:-1]:
            node = node.get(key, {})
        node.pop(path[-1], None)
    defaults = base_config().model
    for field in _LATER_MODEL_FIELDS:
        if values.get("model", {}).get(field, defaults[field]) == defaults[field]:
            values.get("model", {}).pop(field, None)
    return hashlib.sha256(json.dumps(values, sort_keys=True, default=str).encode()).hexdigest()[:10]


def fixed_batches(config: ConfigDict, split: str, n_batches: int) -> list[np.ndarray]:
    """The first `n_batches` batches [batch_size, n_ctx + 1] of a run config's `split`: the same
    tokens for every model a study compares."""
    from resstream.data import eval_batches, split_tokens

    tokens = split_tokens(config, split)
    return eval_batches(tokens, config.model.n_ctx, config.train.batch_size, n_batches)


def unigram_loss(config: ConfigDict) -> float:
    """Validation loss (nats/token) of predicting every token by its frequency in the training
    split: what a model that learned nothing about context reaches. A reference line."""
    from resstream.data import split_tokens

    train, val = split_tokens(config, "train"), split_tokens(config, "validation")
    counts = np.bincount(train, minlength=config.model.vocab_size).astype(np.float64) + 1.0  # add-one: no log 0
    log_p = np.log(counts / counts.sum())
    return float(-log_p[val].mean())


@dataclasses.dataclass
class Findings:
    """What a study measured.

    rows: one dict per measurement (results.csv / results.json);
    table: the report's summary table (rows of equal keys, markdown-formatted);
    figure: the figure (saved as NAME.png);
    measured: a paragraph on what was measured; verdict: "held", "partly held" or "did not hold";
    why: the numbers the verdict rests on; extra: anything else for results.json."""

    rows: list[dict[str, Any]]
    table: list[dict[str, Any]]
    figure: Figure
    measured: str
    verdict: str
    why: str
    extra: dict[str, Any] = dataclasses.field(default_factory=dict)


def run_study(module: ModuleType, config: ConfigDict, command: str) -> Path:
    """Measure `module`'s study with `config` and write its files to config.out_dir (default
    runs/studies/NAME); returns that directory."""
    out = Path(config.out_dir or f"runs/studies/{module.NAME}")
    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    pool = Pool(config)
    findings = module.measure(config, pool)
    minutes = (time.perf_counter() - start) / 60
    figure_name = f"{module.NAME}.png"
    findings.figure.savefig(out / figure_name, dpi=110)
    meta = {
        "study": module.NAME,
        "claim": module.CLAIM,
        "verdict": findings.verdict,
        "why": findings.why,
        "command": command,
        "minutes": minutes,
        "runs": {t.label: str(t.run_dir) for t in pool.trained},
        "reused": [t.label for t in pool.trained if t.reused],
        "config": config.to_dict(),
        **findings.extra,
    }
    write_table(_json_ready(_same_keys(findings.rows)), out / "results", _json_ready(meta))
    (out / "report.md").write_text(_report(module, config, findings, command, minutes, figure_name, pool))
    print(f"\n{module.NAME}: {findings.verdict}. {findings.why}\nwrote {out}/")
    return out


def _report(
    module: ModuleType, config: ConfigDict, f: Findings, command: str, minutes: float, figure: str, pool: Pool
) -> str:
    m, t = config.base.model, config.base.train
    setup = (
        f"Models: byte-level, d_model {m.d_model}, {m.n_heads} heads, context {m.n_ctx}, trained {t.steps} steps "
        f"of {t.batch_size} sequences (learning rate {config.base.optimizer.learning_rate}, warmup "
        f"{config.base.optimizer.warmup_steps} steps) on `{config.base.data.source}`, seeds {list(config.seeds)}, "
        "unless the table says otherwise."
    )
    return "\n".join(
        [
            f"# Study: {module.NAME}",
            "",
            f"**Claim.** {module.CLAIM}",
            "",
            f"**Reference result.** {module.REFERENCE}",
            "",
            f"**Command.** `{command}` ({minutes:.1f} min here; {len(pool.trained)} models, "
            f"{sum(t.reused for t in pool.trained)} of them found already trained in `{config.pool_dir}`).",
            "",
            setup,
            "",
            "## Measured",
            "",
            f.measured,
            "",
            markdown_table(f.table),
            "",
            f"![{module.NAME}]({figure})",
            "",
            f"## Verdict: {f.verdict}",
            "",
            f.why,
            "",
            "Every number: `results.json` / `results.csv` beside this report.",
            "",
        ]
    )


def _json_ready(value: Any) -> Any:
    """`value` with NaN and infinities as null (strict JSON has neither)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _json_ready(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_json_ready(v) for v in value]
    return value


def _same_keys(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Rows of different kinds with one set of columns (in order of first appearance; "" where absent)."""
    keys = list(dict.fromkeys(k for r in rows for k in r))
    return [{k: r.get(k, "") for k in keys} for r in rows]


def markdown_table(rows: Sequence[dict[str, Any]]) -> str:
    """Rows of equal keys as a markdown table; floats with 4 significant digits."""
    if not rows:
        return ""
    keys = list(rows[0])
    lines = ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    lines += ["| " + " | ".join(_cell(r[k]) for k in keys) + " |" for r in rows]
    return "\n".join(lines)


def _cell(value: Any) -> str:
    if isinstance(value, float):
        return "nan" if math.isnan(value) else f"{value:.4g}"
    return str(value)


def verdict_of(checks: Sequence[bool]) -> str:
    """ "held" when every part of a claim held, "did not hold" when none did, else "partly held"."""
    return "held" if all(checks) else "partly held" if any(checks) else "did not hold"


def spread(values: Sequence[float]) -> dict[str, float]:
    """Mean, min and max of per-seed values. A NaN (a seed that diverged) makes the mean NaN: a
    setting where any seed diverged has no mean loss. min and max are over the finite ones."""
    finite = [v for v in values if math.isfinite(v)]
    if not finite:
        return {"mean": math.nan, "min": math.nan, "max": math.nan}
    mean = float(np.mean(finite)) if len(finite) == len(values) else math.nan
    return {"mean": mean, "min": float(min(finite)), "max": float(max(finite))}


def per_seed(pool: Pool, seeds: Sequence[int], label: str, **changes: Any) -> list[tuple[int, Trained]]:
    """(seed, model) for the model of `changes` trained with each seed."""
    out = []
    for seed in seeds:
        train = {**changes.get("train", {}), "seed": seed}
        out.append((seed, pool.train(f"{label}-seed{seed}", **{**changes, "train": train})))
    return out


def rank_correlation(a: Sequence[float], b: Sequence[float]) -> float:
    """Spearman's rank correlation of a and b (ties get their mean rank); NaN if any value is not finite."""
    if not (np.all(np.isfinite(a)) and np.all(np.isfinite(b))):
        return math.nan

    def ranks(x: Sequence[float]) -> np.ndarray:
        x = np.asarray(x, np.float64)
        order = np.argsort(x, kind="stable")
        r = np.empty(len(x))
        r[order] = np.arange(len(x))
        for value in np.unique(x):  # ties: the mean of their ranks
            r[x == value] = r[x == value].mean()
        return r

    ra, rb = ranks(a), ranks(b)
    if ra.std() == 0 or rb.std() == 0:
        return math.nan
    return float(np.corrcoef(ra, rb)[0, 1])
