"""Layer deletion (Veit et al. 2016), and the redundancy scores later work uses to choose which layers
to drop: ShortGPT's Block Influence and Gromov et al.'s angular distance, tested against the measured
cost of each deletion."""

from __future__ import annotations

import math
from typing import Any

import jax.numpy as jnp
import numpy as np
from matplotlib.figure import Figure
from ml_collections import ConfigDict

from resstream.ablation import ablate, deletion_curve
from resstream.studies.common import Findings, Pool, fixed_batches, rank_correlation, study_config, verdict_of

NAME = "deletion"
CLAIM = (
    "A residual network behaves like an ensemble of shallower paths: deleting one layer at test time "
    "barely hurts (except the first layers), and the loss grows smoothly with the number deleted, while a "
    "plain network collapses when any layer is removed. The layers whose input and output streams are "
    "most alike are the cheapest to delete."
)
REFERENCE = (
    "Veit et al. 2016 (Residual Networks Behave Like Ensembles of Relatively Shallow Networks), Fig. 3-5: "
    "deleting single blocks of a 110-layer ResNet costs little except downsampling blocks; a plain VGG drops "
    "to chance; error grows smoothly with blocks deleted. Men et al. 2024 (ShortGPT) rank layers by Block "
    "Influence BI_l = 1 - mean cos(x_l, x_{l+1}); Gromov et al. 2024 (The Unreasonable Ineffectiveness of "
    "the Deeper Layers) drop the n-layer block with the least angular distance arccos(cos(x_l, x_{l+n}))/pi."
)
VARIANTS = {"residual": {"residual": True}, "plain": {"residual": False}}


def get_config() -> ConfigDict:
    return study_config(batches=2, draws=16)


def stream_points(model: Any, tokens: jnp.ndarray) -> np.ndarray:
    """The stream entering each layer and the final stream, [n_layers + 1, tokens, d_model] (float64)."""
    _, cache = model.run_with_cache(tokens, record=("resid_pre",))
    points = jnp.concatenate([cache["resid_pre"], cache["resid_final"][None]], axis=0)
    return np.asarray(points, np.float64).reshape(points.shape[0], -1, points.shape[-1])


def token_cosines(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """cos(x, y) of each token [tokens] of streams x, y [tokens, d_model]."""
    cos = np.sum(x * y, -1) / np.maximum(np.linalg.norm(x, axis=-1) * np.linalg.norm(y, axis=-1), 1e-30)
    return np.clip(cos, -1.0, 1.0)


def block_influence(points: np.ndarray) -> np.ndarray:
    """ShortGPT's BI_l = 1 - mean cos(x_l, x_{l+1}) for each layer, [n_layers]."""
    return np.array([1.0 - token_cosines(points[i], points[i + 1]).mean() for i in range(len(points) - 1)])


def angular_distance(points: np.ndarray, start: int, n: int) -> float:
    """Gromov et al.'s arccos(cos(x_l, x_{l+n})) / pi, averaged over every token (they take the last)."""
    return float(np.mean(np.arccos(token_cosines(points[start], points[start + n])) / math.pi))


def measure(config: ConfigDict, pool: Pool) -> Findings:
    base = config.base
    tokens = np.concatenate(fixed_batches(base, "validation", config.batches))[:, :-1]
    rows: list[dict[str, Any]] = []
    curves, summary = {}, []
    for variant, changes in VARIANTS.items():
        for seed in config.seeds:
            trained = pool.train(f"{variant}-seed{seed}", model=changes, train={"seed": seed})
            if trained.diverged:  # nothing to delete from: its row says so
                summary.append({"variant": variant, "seed": seed, "baseline loss": math.nan})
                continue
            model = trained.model()
            curve = curves[variant, seed] = deletion_curve(model, tokens, draws=config.draws)
            base_loss = float(curve.baseline)
            rows += [{"variant": variant, "seed": seed, "kind": "curve", **r} for r in curve.rows()]
            blocks = _blocks(model, tokens, base_loss)
            points = stream_points(model, tokens)
            influence = block_influence(points)
            for b in blocks:
                b["angular_distance"] = angular_distance(points, b["start"], b["n"])
                b["block_influence"] = float(influence[b["start"]]) if b["n"] == 1 else math.nan
            rows += [{"variant": variant, "seed": seed, "kind": "block", **b} for b in blocks]
            summary.append(_summary(variant, seed, curve, blocks, model.cfg.n_layers))
    verdict, why = _verdict(summary)
    every_single = "; every layer once for k = 1" if base.model.n_layers <= config.draws else ""
    return Findings(
        rows=rows,
        table=[{key: s.get(key, math.nan) for key in max(summary, key=len)} for s in summary],
        figure=_figure(rows, curves, config),
        measured=(
            f"On {tokens.shape[0]} validation sequences of {tokens.shape[1]} bytes, for {base.model.n_layers}-layer "
            "models with and without residual connections: the loss change when k randomly chosen layers are "
            f"deleted ({config.draws} draws per k{every_single}), and when each contiguous block of "
            "n layers is deleted. 'first layer' is the cost of deleting layer 0; 'other single' the mean cost of "
            "deleting one of the others. 'rank corr BI' is the rank correlation, over layers, of ShortGPT's Block "
            "Influence with the measured single-deletion cost (+1: the score orders layers exactly by cost), "
            "'rank corr angular' the same for Gromov et al.'s angular distance between a layer's input and output; "
            "'Gromov excess' is, for each block length n, the cost of the block with the least angular distance "
            "minus the cheapest block's, in nats, averaged over n (0: the score always picks the best block)."
        ),
        verdict=verdict,
        why=why,
    )


def _blocks(model: Any, tokens: np.ndarray, baseline: float) -> list[dict[str, Any]]:
    """The loss change of deleting each contiguous block of n layers, for every n < n_layers."""
    n_layers = model.cfg.n_layers
    out = []
    for n in range(1, max(n_layers, 2)):  # a 1-layer model: its one layer
        for start in range(n_layers - n + 1):
            loss = float(ablate(model, tokens, [f"L{i}" for i in range(start, start + n)], method="delete").loss)
            out.append({"n": n, "start": start, "loss": loss, "delta": loss - baseline})
    return out


def _summary(variant: str, seed: int, curve: Any, blocks: list[dict], n_layers: int) -> dict[str, Any]:
    base = float(curve.baseline)
    by_k = {k: float(v.mean()) - base for k, v in curve.by_k().items()}
    singles = sorted((b for b in blocks if b["n"] == 1), key=lambda b: b["start"])
    costs = [b["delta"] for b in singles]
    excess = []
    for n in sorted({b["n"] for b in blocks}):
        mine = [b for b in blocks if b["n"] == n]
        pick = min(mine, key=lambda b: b["angular_distance"])
        excess.append(pick["delta"] - min(b["delta"] for b in mine))
    return {
        "variant": variant, "seed": seed, "baseline loss": base, "first layer": costs[0],
        "other single": float(np.mean(costs[1:])) if len(costs) > 1 else math.nan,
        f"k={n_layers // 2} mean": by_k.get(n_layers // 2, math.nan), "all deleted": by_k.get(n_layers, math.nan),
        "rank corr BI": rank_correlation([b["block_influence"] for b in singles], costs),
        "rank corr angular": rank_correlation([b["angular_distance"] for b in singles], costs),
        "Gromov excess": float(np.mean(excess)),
    }  # fmt: skip


def _verdict(summary: list[dict[str, Any]]) -> tuple[str, str]:
    def mean(variant: str, key: str) -> float:
        values = [s.get(key, math.nan) for s in summary if s["variant"] == variant]
        return float(np.nanmean(values)) if np.isfinite(values).any() else math.nan

    resid_single, plain_single = mean("residual", "other single"), mean("plain", "other single")
    resid_first = mean("residual", "first layer")
    resid_base = mean("residual", "baseline loss")
    smooth = resid_single < 0.1 * resid_base and resid_single < plain_single / 3
    first_matters = resid_first > 2 * resid_single
    corr = mean("residual", "rank corr BI")
    predicts = corr > 0.5
    why = (
        f"Deleting one layer other than the first costs {resid_single:.3f} nats on average in the residual model "
        f"(baseline {resid_base:.3f}) against {plain_single:.3f} in the plain one; the first layer costs "
        f"{resid_first:.3f}. Block Influence orders the residual model's layers by deletion cost with rank "
        f"correlation {corr:+.2f} (angular distance: {mean('residual', 'rank corr angular'):+.2f}); the block "
        f"Gromov's angular distance picks costs {mean('residual', 'Gromov excess'):.3f} nats more than the best "
        f"block on average. Counted as held: single deletions < 10% of the loss and < 1/3 of the plain "
        f"model's ({'yes' if smooth else 'no'}), the first layer > 2x the others ({'yes' if first_matters else 'no'}), "
        f"rank correlation > 0.5 ({'yes' if predicts else 'no'})."
    )
    return verdict_of([smooth, first_matters, predicts]), why


def _figure(rows: list[dict[str, Any]], curves: dict, config: ConfigDict) -> Figure:
    fig = Figure(figsize=(14, 4.2))
    ax_curve, ax_layers, ax_score = fig.subplots(1, 3)
    seed = config.seeds[0]
    for (variant, s), curve in curves.items():
        if s != seed:
            continue
        base = float(curve.baseline)
        by_k = curve.by_k()
        (line,) = ax_curve.plot(list(by_k), [v.mean() - base for v in by_k.values()], marker="o", label=variant)
        for k, v in by_k.items():
            ax_curve.scatter([k] * len(v), v - base, s=6, alpha=0.3, color=line.get_color())
    ax_curve.set(xlabel="layers deleted", ylabel="loss change (nats)", title="random deletions (dots: draws)")
    ax_curve.legend()
    singles = [r for r in rows if r["kind"] == "block" and r["n"] == 1 and r["seed"] == seed]
    for variant in VARIANTS:
        mine = sorted((r for r in singles if r["variant"] == variant), key=lambda r: r["start"])
        ax_layers.plot([r["start"] for r in mine], [r["delta"] for r in mine], marker="o", label=variant)
    ax_layers.set(xlabel="layer deleted", ylabel="loss change (nats)", title="single deletions", yscale="symlog")
    ax_layers.legend()
    resid = sorted((r for r in singles if r["variant"] == "residual"), key=lambda r: r["start"])
    ax_score.scatter([r["block_influence"] for r in resid], [r["delta"] for r in resid])
    for r in resid:
        ax_score.annotate(f"L{r['start']}", (r["block_influence"], r["delta"]), fontsize="small")
    ax_score.set(
        xlabel="Block Influence 1 - cos(x_l, x_l+1)", ylabel="loss change when deleted (nats)", xscale="log",
        title="residual model: score against cost",
    )  # fmt: skip
    ax_score.set_yscale("symlog", linthresh=1e-2)  # a deletion can lower the loss a little
    fig.tight_layout()
    return fig
