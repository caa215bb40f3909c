"""Tables (CSV, JSON) and pictures (PNG) of ablation studies: the sweep's total and direct effects,
layer-deletion curves, activation-patching heatmaps."""

from __future__ import annotations

import csv
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.figure import Figure  # not pyplot: no global backend or figure state is touched

from resstream.ablation import DeletionCurve, SweepTable
from resstream.patching import PatchingResult


def write_table(rows: Sequence[dict[str, Any]], path: Path, meta: dict[str, Any] | None = None) -> None:
    """`rows` as path.csv and (with `meta`) path.json."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_suffix(".csv"), "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    path.with_suffix(".json").write_text(json.dumps({**(meta or {}), "rows": list(rows)}, indent=2) + "\n")


def plot_sweep(table: SweepTable, path: Path, title: str = "") -> None:
    """Bars of the loss change when each component is ablated: total effect and, beside it, the
    direct effect (its own path to the logits)."""
    rows = table.rows()
    x = np.arange(len(rows))
    fig = Figure(figsize=(max(6.0, 0.35 * len(rows) + 2), 4))
    ax = fig.subplots()
    has_direct = table.direct is not None
    width = 0.4 if has_direct else 0.8
    ax.bar(x - (width / 2 if has_direct else 0), [r["total_effect"] for r in rows], width, label="total effect")
    if has_direct:
        ax.bar(x + width / 2, [r["direct_effect"] for r in rows], width, label="direct effect")
    ax.axhline(0, color="black", linewidth=0.8)
    ax.set_xticks(x, [r["component"] for r in rows], rotation=90 if len(rows) > 12 else 0)
    ax.set_ylabel("loss change (nats)")
    ax.set_title(title or f"{table.method} ablation (baseline loss {float(table.baseline):.3f})")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def plot_deletion(curves: dict[str, DeletionCurve], path: Path) -> None:
    """Loss change against the number of layers deleted: every draw as a dot, the mean as a line;
    one colour per run."""
    fig = Figure(figsize=(6, 4))
    ax = fig.subplots()
    rng = np.random.default_rng(0)
    for name, curve in curves.items():
        by_k = curve.by_k()
        ks = np.array(list(by_k))
        base = float(curve.baseline)
        means = [np.mean(v) - base for v in by_k.values()]
        (line,) = ax.plot(ks, means, marker="o", label=f"{name}: mean of draws (baseline {base:.2f} nats)")
        for k, losses in by_k.items():
            jitter = rng.uniform(-0.12, 0.12, len(losses))
            ax.scatter(k + jitter, losses - base, s=8, alpha=0.4, color=line.get_color())
    ax.set_xlabel("layers deleted")
    ax.set_ylabel("loss change (nats)")
    ax.set_title("layer deletion (dots: single draws)")
    ax.legend(loc="upper left", fontsize="small")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def plot_patching(result: PatchingResult, tokens: Sequence[str], path: Path) -> None:
    """Heatmap [layers, positions] of the fraction of the clean logit difference recovered."""
    recovered = np.asarray(result.recovered)
    fig = Figure(figsize=(max(5.0, 0.35 * recovered.shape[1] + 2), 0.4 * recovered.shape[0] + 2))
    ax = fig.subplots()
    limit = max(1.0, float(np.nanmax(np.abs(recovered))))
    image = ax.imshow(recovered, cmap="RdBu", vmin=-limit, vmax=limit, aspect="auto")
    ax.set_xticks(range(len(tokens)), tokens, rotation=90 if len(tokens) > 20 else 0)
    ax.set_yticks(range(recovered.shape[0]))
    ax.set_xlabel("position")
    ax.set_ylabel("layer (stream entering it)")
    ax.set_title(
        f"clean stream patched into the corrupted run\nlogit diff: clean {float(result.clean_diff):.2f}, "
        f"corrupted {float(result.corrupted_diff):.2f}"
    )
    fig.colorbar(image, ax=ax, label="fraction recovered")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
