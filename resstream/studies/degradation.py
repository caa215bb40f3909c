"""The degradation problem (He et al. 2016): deeper plain networks train worse, residual ones do not."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
from matplotlib.figure import Figure
from ml_collections import ConfigDict

from resstream.studies.common import Findings, Pool, per_seed, spread, study_config, unigram_loss, verdict_of

NAME = "degradation"
CLAIM = (
    "Stacking more layers onto a plain network (no identity connections) makes it train worse, on the "
    "training set too, so the problem is optimisation, not overfitting; the same network with residual "
    "connections does not get worse with depth."
)
REFERENCE = (
    "He et al. 2016 (Deep Residual Learning), Fig. 1 and 4: on CIFAR-10 and ImageNet a 56-layer (34-layer) "
    "plain network has higher training and test error than a 20-layer (18-layer) one, while ResNet-34 beats "
    "ResNet-18."
)
VARIANTS = {"residual": {"residual": True}, "plain": {"residual": False}}


def get_config() -> ConfigDict:
    config = study_config(depths=(2, 4, 8, 16, 32), seeds=(0, 1))
    config.base.model.update(d_model=32, n_ctx=32)
    config.base.train.update(steps=300, eval_every=300, checkpoint_every=300)
    return config


def measure(config: ConfigDict, pool: Pool) -> Findings:
    rows: list[dict[str, Any]] = []
    for variant, model in VARIANTS.items():
        for depth in config.depths:
            changes = {"model": {**model, "n_layers": depth}}
            for seed, t in per_seed(pool, config.seeds, f"{variant}-L{depth}", **changes):
                rows.append(
                    {"variant": variant, "depth": depth, "seed": seed, "train_loss": t.train_loss(),
                     "val_loss": t.val_loss, "diverged": bool(t.diverged)}
                )  # fmt: skip
    unigram = unigram_loss(config.base)
    table = _table(rows, config)
    verdict, why = _verdict(rows, tuple(sorted(config.depths)))
    return Findings(
        rows=rows,
        table=table,
        figure=_figure(rows, config, unigram),
        measured=(
            f"Training loss (on the same {config.base.train.eval_batches} training batches for every model) and "
            f"validation loss, in nats per byte, of "
            f"pre-LN models of {list(config.depths)} layers with and without residual connections, each trained "
            f"{config.base.train.steps} steps, seeds {list(config.seeds)} (mean, and min-max over seeds). "
            f"A model that predicts bytes by their frequency alone scores {unigram:.3f}."
        ),
        verdict=verdict,
        why=why,
        extra={"unigram_loss": unigram},
    )


def _table(rows: list[dict[str, Any]], config: ConfigDict) -> list[dict[str, Any]]:
    table = []
    for variant in VARIANTS:
        for depth in config.depths:
            mine = [r for r in rows if r["variant"] == variant and r["depth"] == depth]
            train, val = spread([r["train_loss"] for r in mine]), spread([r["val_loss"] for r in mine])
            table.append(
                {"variant": variant, "depth": depth, "train loss": train["mean"],
                 "train min-max": f"{train['min']:.3f}-{train['max']:.3f}", "val loss": val["mean"],
                 "diverged": sum(r["diverged"] for r in mine)}
            )  # fmt: skip
    return table


def _verdict(rows: list[dict[str, Any]], depths: tuple[int, ...]) -> tuple[str, str]:
    """Plain: is its deepest model's training loss above its best shallower one's, beyond the seed
    spread? Residual: is its deepest model's within the seed spread of its best?"""
    stats = {
        (v, d): spread([r["train_loss"] for r in rows if r["variant"] == v and r["depth"] == d])
        for v in VARIANTS
        for d in depths
    }

    def noise(variant: str) -> float:
        """The variant's seed spread: its largest min-max at one depth (at least 0.02 nats)."""
        return max(
            [stats[variant, d]["max"] - stats[variant, d]["min"] for d in depths if stats[variant, d]["mean"] > 0]
            + [0.02]
        )

    plain = [stats["plain", d]["mean"] for d in depths]
    resid = [stats["residual", d]["mean"] for d in depths]
    best_plain = int(np.nanargmin(plain)) if np.isfinite(plain).any() else 0
    plain_worse = not math.isfinite(plain[-1]) or plain[-1] - plain[best_plain] > noise("plain")
    resid_ok = math.isfinite(resid[-1]) and resid[-1] - min(resid) <= noise("residual")
    why = (
        f"Plain: training loss {plain[best_plain]:.3f} at its best depth ({depths[best_plain]}), {plain[-1]:.3f} at "
        f"{depths[-1]} layers (seed spread {noise('plain'):.3f}). Residual: best {min(resid):.3f}, "
        f"{resid[-1]:.3f} at {depths[-1]} layers (seed spread {noise('residual'):.3f}). A rise beyond the "
        "variant's seed spread (its largest min-max at one depth, at least 0.02 nats) counts as getting worse."
    )
    return verdict_of([plain_worse, resid_ok]), why


def _figure(rows: list[dict[str, Any]], config: ConfigDict, unigram: float) -> Figure:
    fig = Figure(figsize=(10, 4))
    axes = fig.subplots(1, 2, sharey=True)
    for ax, key, title in zip(axes, ("train_loss", "val_loss"), ("training loss", "validation loss"), strict=True):
        for variant in VARIANTS:
            mine = [r for r in rows if r["variant"] == variant]
            means = [np.nanmean([r[key] for r in mine if r["depth"] == d]) for d in config.depths]
            (line,) = ax.plot(config.depths, means, marker="o", label=variant)
            ax.scatter([r["depth"] for r in mine], [r[key] for r in mine], s=10, alpha=0.5, color=line.get_color())
        ax.axhline(unigram, color="grey", linestyle=":", label="byte frequencies only")
        ax.set_xscale("log", base=2)
        ax.set_xticks(config.depths, [str(d) for d in config.depths])
        ax.set_xlabel("layers")
        ax.set_title(f"{title} after {config.base.train.steps} steps")
    axes[0].set_ylabel("loss (nats/byte); dots: seeds")
    axes[0].legend()
    fig.tight_layout()
    return fig
