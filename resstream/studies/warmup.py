"""Learning-rate warmup (Xiong et al. 2020): post-LN Transformers need it, pre-LN ones do not."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
from matplotlib.figure import Figure
from ml_collections import ConfigDict

from resstream.studies.common import (
    Findings,
    Pool,
    StudyError,
    per_seed,
    spread,
    study_config,
    unigram_loss,
    verdict_of,
)

NAME = "warmup"
CLAIM = (
    "A post-LN Transformer trained with Adam needs a learning-rate warmup: without it, training is slow or "
    "diverges at learning rates that work with warmup. A pre-LN Transformer trains as well without warmup."
)
REFERENCE = (
    "Xiong et al. 2020 (On Layer Normalization in the Transformer Architecture), Fig. 2 and 4: post-LN "
    "BERT/translation models without warmup (or with too short a one) end far worse at lr 5e-4 and 1e-3; "
    "pre-LN models without warmup reach post-LN-with-warmup quality faster. Liu et al. 2020 attribute the "
    "need to Adam's large early variance together with post-LN's dependence on its residual branches."
)
PLACEMENTS = ("pre", "post")


def get_config() -> ConfigDict:
    config = study_config(learning_rates=(1e-3, 3e-3, 1e-2), warmup_steps=100, margin=0.05)
    config.base.model.update(n_layers=6, d_model=64, n_ctx=32)
    config.base.train.update(steps=400, eval_every=400, checkpoint_every=400)
    return config


def measure(config: ConfigDict, pool: Pool) -> Findings:
    if config.warmup_steps < 1:
        raise StudyError(f"warmup_steps={config.warmup_steps}: the study compares a warmup with none; give 1 or more")
    rows: list[dict[str, Any]] = []
    for placement in PLACEMENTS:
        for warmup in (config.warmup_steps, 0):
            for lr in config.learning_rates:
                label = f"{placement}-LN-lr{lr:g}-warmup{warmup}"
                optimizer = {"learning_rate": lr, "warmup_steps": warmup}
                for seed, t in per_seed(
                    pool, config.seeds, label, model={"norm_placement": placement}, optimizer=optimizer
                ):
                    rows.append(
                        {"placement": f"{placement}-LN", "warmup": warmup, "learning_rate": lr, "seed": seed,
                         "train_loss": t.train_loss(), "val_loss": t.val_loss, "diverged": bool(t.diverged)}
                    )  # fmt: skip
    unigram = unigram_loss(config.base)
    table = _table(rows)
    verdict, why = _verdict(table, config.margin)
    return Findings(
        rows=rows,
        table=table,
        figure=_figure(rows, config, unigram),
        measured=(
            f"Validation loss (nats/byte) of {config.base.model.n_layers}-layer pre-LN and post-LN models trained "
            f"{config.base.train.steps} steps at peak learning rates {list(config.learning_rates)}, with a linear "
            f"warmup of {config.warmup_steps} steps or none (cosine decay after it either way), seeds "
            f"{list(config.seeds)}. 'diverged': the loss stopped being finite. Byte frequencies alone score "
            f"{unigram:.3f}. 'cost of no warmup' is the loss without warmup minus the loss with it."
        ),
        verdict=verdict,
        why=why,
        extra={"unigram_loss": unigram},
    )


def _table(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    table = []
    for placement in {r["placement"]: None for r in rows}:
        for lr in {r["learning_rate"]: None for r in rows}:
            pick = {
                w: [r for r in rows if r["placement"] == placement and r["learning_rate"] == lr and r["warmup"] == w]
                for w in {r["warmup"]: None for r in rows}
            }
            with_w, without = (pick[w] for w in sorted(pick, reverse=True))
            a, b = spread([r["val_loss"] for r in with_w]), spread([r["val_loss"] for r in without])
            diverged = f"{sum(r['diverged'] for r in with_w)} / {sum(r['diverged'] for r in without)}"
            table.append(
                {"placement": placement, "learning rate": lr, "val loss, warmup": a["mean"],
                 "val loss, no warmup": b["mean"], "cost of no warmup": b["mean"] - a["mean"],
                 "diverged (warmup / none)": diverged}
            )  # fmt: skip
    return table


def _cost(row: dict[str, Any]) -> float:
    """The loss cost of dropping warmup; a run that diverged without warmup costs infinity."""
    if not math.isfinite(row["val loss, no warmup"]):
        return math.inf if math.isfinite(row["val loss, warmup"]) else math.nan
    return row["cost of no warmup"]


def _verdict(table: list[dict[str, Any]], margin: float) -> tuple[str, str]:
    post = {r["learning rate"]: _cost(r) for r in table if r["placement"] == "post-LN"}
    pre = {r["learning rate"]: _cost(r) for r in table if r["placement"] == "pre-LN"}
    post_needs = any(c > margin for c in post.values())
    pre_does_not = all(not c > margin for c in pre.values())
    fmt = lambda costs: ", ".join(f"lr {lr:g}: {c:+.3f}" for lr, c in costs.items())  # noqa: E731
    why = (
        f"Cost of training without warmup (validation loss without minus with; inf: diverged only without). "
        f"Post-LN: {fmt(post)}. Pre-LN: {fmt(pre)}. A cost above {margin} nats counts as needing warmup: "
        f"post-LN {'does' if post_needs else 'does not'}, pre-LN {'does not' if pre_does_not else 'does'}."
    )
    return verdict_of([post_needs, pre_does_not]), why


def _figure(rows: list[dict[str, Any]], config: ConfigDict, unigram: float) -> Figure:
    fig = Figure(figsize=(7, 4.5))
    ax = fig.subplots()
    top = max([r["val_loss"] for r in rows if math.isfinite(r["val_loss"])] + [unigram]) + 0.2
    for placement in ("pre-LN", "post-LN"):
        for warmup in (config.warmup_steps, 0):
            mine = [r for r in rows if r["placement"] == placement and r["warmup"] == warmup]
            lrs = list(config.learning_rates)
            means = [np.nanmean([r["val_loss"] for r in mine if r["learning_rate"] == lr] or [np.nan]) for lr in lrs]
            style = "-" if warmup else "--"
            color = "tab:blue" if placement == "pre-LN" else "tab:red"
            ax.plot(lrs, means, style, marker="o", color=color, label=f"{placement}, warmup {warmup}")
            dead = [r["learning_rate"] for r in mine if r["diverged"]]
            ax.scatter(dead, [top] * len(dead), marker="x", s=60, color=color)
    ax.axhline(unigram, color="grey", linestyle=":", label="byte frequencies only")
    ax.set_xscale("log")
    ax.set_xlabel("peak learning rate")
    ax.set_ylabel("validation loss (nats/byte); x: diverged")
    ax.set_title(f"{config.base.model.n_layers} layers, {config.base.train.steps} steps")
    ax.legend(fontsize="small")
    fig.tight_layout()
    return fig
