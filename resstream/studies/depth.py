"""Very deep networks: 1000 residual layers optimise, 1000 plain ones do not; post-LN at that depth
needs DeepNorm (Wang et al. 2022)."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
from matplotlib.figure import Figure
from ml_collections import ConfigDict

from resstream.studies.common import Findings, Pool, study_config, unigram_loss, verdict_of

NAME = "depth"
CLAIM = (
    "A residual network of 1000 sequential layers can still be optimised (its loss falls from the first "
    "steps), while a plain network of the same depth cannot. At that depth a post-LN Transformer fails to "
    "train, and DeepNorm (x_{l+1} = LN(alpha x_l + G(x_l)) with alpha = (2N)^(1/4) and the value, output and "
    "FFN weights initialised scaled by beta = (8N)^(-1/4)) makes it train."
)
REFERENCE = (
    "He et al. 2016b (Identity Mappings), Fig. 1 and Table 3: a 1001-layer pre-activation ResNet trains "
    "(4.62% CIFAR-10 error); Wang et al. 2022 (DeepNet), Fig. 1 and 6: post-LN diverges beyond ~100 layers "
    "while DeepNorm trains 1000-layer (2500 sublayer) Transformers stably."
)
VARIANTS = {
    "pre-LN residual": {"norm_placement": "pre", "residual": True},
    "pre-LN plain": {"norm_placement": "pre", "residual": False},
    "post-LN residual": {"norm_placement": "post", "residual": True},
    "post-LN DeepNorm": {"norm_placement": "post", "residual": True, "deepnorm": True},
}


def get_config() -> ConfigDict:
    config = study_config(margin=0.1)
    config.base.model.update(n_layers=1000, d_model=16, n_heads=2, n_ctx=16)
    config.base.optimizer.update(learning_rate=3e-3, warmup_steps=20)
    config.base.train.update(steps=200, batch_size=8, log_every=5, eval_every=200, eval_batches=4, checkpoint_every=200)
    return config


def measure(config: ConfigDict, pool: Pool) -> Findings:
    n_layers, seed = config.base.model.n_layers, config.seeds[0]
    rows: list[dict[str, Any]] = []
    table = []
    curves = {}
    for variant, changes in VARIANTS.items():
        t = pool.train(f"{variant.replace(' ', '-')}-L{n_layers}", model=changes, train={"seed": seed})
        log = [(r["step"], r["loss"]) for r in t.log() if "loss" in r]
        curves[variant] = log
        rows += [{"variant": variant, "step": s, "train_loss": loss} for s, loss in log]
        first, final = (log[0][1] if log else math.nan), t.train_loss()
        table.append(
            {"variant": variant, "first logged loss": first, "final train loss": final,
             "val loss": t.val_loss, "fall": first - final, "diverged": bool(t.diverged)}
        )  # fmt: skip
    unigram = unigram_loss(config.base)
    verdict, why = _verdict(table, unigram, config.margin)
    return Findings(
        rows=rows,
        table=table,
        figure=_figure(curves, unigram, n_layers),
        measured=(
            f"Training loss (nats/byte, logged every {config.base.train.log_every} steps) of {n_layers}-layer models "
            f"of width {config.base.model.d_model} trained {config.base.train.steps} steps of "
            f"{config.base.train.batch_size} x {config.base.model.n_ctx} bytes (learning rate "
            f"{config.base.optimizer.learning_rate}, warmup {config.base.optimizer.warmup_steps}), and the "
            f"validation loss at the end. 'fall' is the first logged loss minus the final one. Byte frequencies "
            f"alone score {unigram:.3f}: a model above that line has learned nothing about context."
        ),
        verdict=verdict,
        why=why,
        extra={"unigram_loss": unigram},
    )


def _verdict(table: list[dict[str, Any]], unigram: float, margin: float) -> tuple[str, str]:
    by = {r["variant"]: r for r in table}

    def trains(variant: str) -> bool:
        loss = by[variant]["val loss"]
        return math.isfinite(loss) and loss < unigram - margin

    checks = {
        "pre-LN residual trains": trains("pre-LN residual"),
        "pre-LN plain does not": not trains("pre-LN plain"),
        "post-LN residual does not": not trains("post-LN residual"),
        "post-LN DeepNorm trains": trains("post-LN DeepNorm"),
    }
    losses = ", ".join(f"{v} {r['val loss']:.3f}" + (" (diverged)" if r["diverged"] else "") for v, r in by.items())
    why = (
        f"Validation loss: {losses}; byte frequencies alone: {unigram:.3f}. A model counts as trained when it "
        f"ends more than {margin} nats below that. "
        + "; ".join(f"{k}: {'yes' if v else 'no'}" for k, v in checks.items())
        + "."
    )
    return verdict_of(list(checks.values())), why


def _figure(curves: dict[str, list], unigram: float, n_layers: int) -> Figure:
    fig = Figure(figsize=(7, 4.5))
    ax = fig.subplots()
    for variant, log in curves.items():
        if log:
            ax.plot([s for s, _ in log], [loss for _, loss in log], label=variant)
    ax.axhline(unigram, color="grey", linestyle=":", label="byte frequencies only")
    ax.axhline(math.log(256), color="black", linestyle=":", linewidth=0.8, label="uniform over bytes")
    ax.set(xlabel="step", ylabel="training loss (nats/byte)", title=f"{n_layers} layers")
    finite = [loss for log in curves.values() for _, loss in log if np.isfinite(loss)]
    if finite:
        ax.set_ylim(min(finite) - 0.2, max(max(finite), math.log(256)) + 0.2)
    ax.legend(fontsize="small")
    fig.tight_layout()
    return fig
