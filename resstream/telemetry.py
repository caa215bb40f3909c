"""Training telemetry: a JSONL log (always), TensorBoard event files, and PNG plots of a run.

A record is a flat dict of numbers plus per-layer lists ("layer_attn_out_norm": [n_layers]).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np


def _plain(value: Any) -> Any:
    """JSON-ready: arrays become lists, numpy scalars become Python numbers."""
    array = np.asarray(value)
    if array.ndim == 0:
        return array.item()
    return array.tolist()


class MetricsLog:
    """Appends records to `run_dir/metrics.jsonl` and mirrors scalars to TensorBoard."""

    def __init__(self, run_dir: str | Path, tensorboard: bool = True):
        self.path = Path(run_dir) / "metrics.jsonl"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.writer = None
        if tensorboard:
            from tensorboardX import SummaryWriter

            self.writer = SummaryWriter(str(Path(run_dir) / "tensorboard"))

    def truncate_after(self, step: int) -> None:
        """Drop records past `step` (written after the checkpoint a run resumes from)."""
        if not self.path.exists():
            return
        kept = [line for line, record in _parsed_lines(self.path) if record["step"] <= step]
        self.path.write_text("".join(line + "\n" for line in kept))

    def write(self, record: dict[str, Any]) -> None:
        """Append one record (a dict with "step") to the JSONL log and TensorBoard."""
        record = {key: _plain(value) for key, value in record.items()}
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")
        if self.writer is not None:
            step = record["step"]
            for key, value in record.items():
                if key == "step":
                    continue
                if isinstance(value, list):
                    for layer, v in enumerate(value):
                        self.writer.add_scalar(f"{key}/{layer}", v, step)
                elif isinstance(value, int | float) and not isinstance(value, bool):
                    self.writer.add_scalar(key, value, step)
            self.writer.flush()

    def close(self) -> None:
        """Flush and close the log files."""
        if self.writer is not None:
            self.writer.close()


def read_log(run_dir: str | Path) -> list[dict[str, Any]]:
    """The records of `run_dir/metrics.jsonl` (none if it does not exist), a torn line left out."""
    path = Path(run_dir) / "metrics.jsonl"
    return [record for _, record in _parsed_lines(path)] if path.exists() else []


def _parsed_lines(path: Path) -> list[tuple[str, dict[str, Any]]]:
    """Each line of a JSONL log with its record, skipping lines that are not a whole record: a run killed
    mid-write leaves a torn last line, and an append-only log is read up to it."""
    parsed = []
    for line in path.read_text(errors="replace").splitlines():  # a torn line may end inside a character
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(record, dict):
            parsed.append((line, record))
    return parsed


def plot_run(run_dir: str | Path) -> list[Path]:
    """Write loss.png (train and validation loss), stream.png (per-layer write and stream norms
    over training) and gradients.png (per-layer gradient norm over training) into `run_dir`."""
    from matplotlib import colormaps
    from matplotlib.figure import Figure  # not pyplot: no global backend or figure state is touched

    run_dir = Path(run_dir)
    records = read_log(run_dir)
    train = [r for r in records if "loss" in r]
    val = [r for r in records if "val_loss" in r]
    written = []
    if train:
        fig = Figure(figsize=(7, 4))
        ax = fig.subplots()
        ax.plot([r["step"] for r in train], [r["loss"] for r in train], label="train")
        if val:
            ax.plot([r["step"] for r in val], [r["val_loss"] for r in val], "o-", label="validation")
        ax.set(xlabel="step", ylabel="loss (nats/token)", title="Loss")
        ax.legend()
        ax.grid(alpha=0.3)
        written.append(_save(fig, run_dir / "loss.png"))

    layered = [r for r in train if "layer_resid_pre_norm" in r]
    if layered:
        steps = [r["step"] for r in layered]
        names = [n for n in ("layer_resid_pre_norm", "layer_attn_out_norm", "layer_mlp_out_norm") if n in layered[0]]
        fig = Figure(figsize=(5 * len(names), 4))
        axes = fig.subplots(1, len(names), squeeze=False)
        for ax, name in zip(axes[0], names, strict=True):
            values = np.array([r[name] for r in layered])  # [records, n_layers]
            colors = colormaps["viridis"](np.linspace(0, 1, values.shape[1]))
            for layer in range(values.shape[1]):
                ax.plot(steps, values[:, layer], color=colors[layer], label=f"layer {layer}")
            ax.set(
                xlabel="step",
                ylabel="mean token L2 norm",
                title=name.removeprefix("layer_").replace("_", " ").replace("resid pre", "stream entering"),
            )
            ax.grid(alpha=0.3)
        axes[0][0].legend(fontsize="small")
        written.append(_save(fig, run_dir / "stream.png"))

    graded = [r for r in train if "layer_grad_norm" in r]
    if graded:
        values = np.array([r["layer_grad_norm"] for r in graded])
        fig = Figure(figsize=(7, 4))
        ax = fig.subplots()
        colors = colormaps["viridis"](np.linspace(0, 1, values.shape[1]))
        for layer in range(values.shape[1]):
            ax.plot([r["step"] for r in graded], values[:, layer], color=colors[layer], label=f"layer {layer}")
        ax.set(xlabel="step", ylabel="gradient L2 norm", yscale="log", title="Gradient norm by layer")
        ax.legend(fontsize="small")
        ax.grid(alpha=0.3)
        written.append(_save(fig, run_dir / "gradients.png"))
    return written


def _save(fig: Any, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    return path
