"""Stochastic depth (Huang et al. 2016): dropping whole layers in training makes the network robust to
their removal at test time, at little or no cost in loss."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
from matplotlib.figure import Figure
from ml_collections import ConfigDict

from resstream.ablation import deletion_curve
from resstream.studies.common import Findings, Pool, fixed_batches, spread, study_config, verdict_of

NAME = "stochastic-depth"
CLAIM = (
    "Training with stochastic depth (each layer skipped for a whole example with a probability that grows "
    "linearly to p_L = 0.5 at the last layer) makes the network much more robust to deleting layers at test "
    "time, at little or no cost in validation loss."
)
REFERENCE = (
    "Huang et al. 2016 (Deep Networks with Stochastic Depth), Sec. 4 and Fig. 8: survival p_l = 1 - (l/L)(1 - "
    "p_L), p_L = 0.5; on CIFAR-10 a 110-layer ResNet trained this way has lower test error, and its error "
    "grows less than the plain ResNet's when blocks are dropped at test time. Veit et al. 2016 (Fig. 4) show "
    "the same robustness to deletion."
)


def get_config() -> ConfigDict:
    return study_config(drop_last=0.5, batches=2, draws=16, seeds=(0, 1))


def measure(config: ConfigDict, pool: Pool) -> Findings:
    base = config.base
    tokens = np.concatenate(fixed_batches(base, "validation", config.batches))[:, :-1]
    variants = {"without": 0.0, "with": float(config.drop_last)}
    rows: list[dict[str, Any]] = []
    curves, table = {}, []
    for variant, drop in variants.items():
        for seed in config.seeds:
            trained = pool.train(
                f"stochastic-depth-{drop:g}-seed{seed}", model={"stochastic_depth": drop}, train={"seed": seed}
            )
            if trained.diverged:  # its row says so; there is no model to delete from
                table.append({"stochastic depth": variant, "seed": seed, "val loss": math.nan})
                continue
            curve = curves[variant, seed] = deletion_curve(trained.model(), tokens, draws=config.draws)
            base_loss = float(curve.baseline)
            rows += [{"variant": variant, "seed": seed, "val_loss": trained.val_loss, **r} for r in curve.rows()]
            by_k = {k: float(v.mean()) - base_loss for k, v in curve.by_k().items()}
            n = max(by_k)
            later = [
                float(x) - base_loss for d, x in zip(curve.deleted, curve.loss, strict=True) if len(d) == 1 and d[0]
            ]
            table.append(
                {"stochastic depth": variant, "seed": seed, "val loss": trained.val_loss, "1 deleted": by_k[1],
                 "1 deleted, not layer 0": float(np.mean(later)) if later else math.nan,
                 "half deleted": by_k[n // 2], "all deleted": by_k[n]}
            )  # fmt: skip
    table = [{key: r.get(key, math.nan) for key in max(table, key=len)} for r in table]
    verdict, why = _verdict(table, base.model.n_layers // 2)
    return Findings(
        rows=rows,
        table=table,
        figure=_figure(curves),
        measured=(
            f"Validation loss (nats/byte) of {base.model.n_layers}-layer pre-LN residual models trained "
            f"{base.train.steps} steps with and without stochastic depth (drop probability rising linearly from 0 "
            f"at layer 0 to {config.drop_last} at the last layer; survivors scaled by 1/(1 - p) in training, the "
            "inverted form, so nothing is rescaled at test time), seeds "
            f"{list(config.seeds)}; and the mean loss change on {tokens.shape[0]} validation sequences when k "
            f"random layers are deleted ({config.draws} draws per k; 'half': k = {base.model.n_layers // 2}). "
            "Huang et al. "
            "drop layer l (1-based) with probability (l/L)(1 - p_L); here layer 0 is never dropped, the last "
            "with p = 1 - p_L."
        ),
        verdict=verdict,
        why=why,
    )


def _verdict(table: list[dict[str, Any]], half_k: int) -> tuple[str, str]:
    def stat(variant: str, key: str) -> dict[str, float]:
        return spread([r[key] for r in table if r["stochastic depth"] == variant])

    half = "half deleted"
    later_with, later_without = (
        stat("with", "1 deleted, not layer 0")["mean"],
        stat("without", "1 deleted, not layer 0")["mean"],
    )
    loss_with, loss_without = stat("with", "val loss"), stat("without", "val loss")
    one_with, one_without = stat("with", "1 deleted")["mean"], stat("without", "1 deleted")["mean"]
    half_with, half_without = stat("with", half)["mean"], stat("without", half)["mean"]
    robust = half_with < 0.5 * half_without and one_with < one_without
    noise = max(loss_without["max"] - loss_without["min"], loss_with["max"] - loss_with["min"], 0.02)
    cheap = loss_with["mean"] - loss_without["mean"] <= max(0.05, noise)
    why = (
        f"Deleting {half_k} random layers costs {half_with:.3f} nats with stochastic depth against "
        f"{half_without:.3f} without (1 layer: {one_with:.3f} against {one_without:.3f}; 1 layer other than layer 0, "
        f"which is never dropped in training: {later_with:.3f} against {later_without:.3f}); validation loss "
        f"{loss_with['mean']:.3f} with against {loss_without['mean']:.3f} without (seed spread {noise:.3f}). "
        f"Counted as held: the half-deletion cost at most half ({'yes' if robust else 'no'}), and the loss within "
        f"max(0.05, seed spread) of the model without it ({'yes' if cheap else 'no'})."
    )
    return verdict_of([robust, cheap]), why


def _figure(curves: dict) -> Figure:
    fig = Figure(figsize=(6.5, 4.2))
    ax = fig.subplots()
    colors = {"without": "tab:blue", "with": "tab:orange"}
    for (variant, seed), curve in curves.items():
        base = float(curve.baseline)
        by_k = curve.by_k()
        ax.plot(list(by_k), [v.mean() - base for v in by_k.values()], marker="o", color=colors[variant],
                alpha=0.9 if seed == min(s for _, s in curves) else 0.5,
                label=f"{variant} stochastic depth, seed {seed} (loss {base:.2f})")  # fmt: skip
    ax.set(xlabel="layers deleted at test time", ylabel="loss change (nats, mean of draws)")
    ax.set_title("deletion curves")
    ax.legend(fontsize="small")
    fig.tight_layout()
    return fig
