"""The residual-stream view (Elhage et al. 2021): layers read from and add to a shared stream, so the
prediction builds up layer by layer and the logits are a sum of the layers' direct contributions."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from matplotlib.figure import Figure
from ml_collections import ConfigDict

from resstream import analysis
from resstream.runs import load_run
from resstream.stream import token_norm
from resstream.studies.common import Findings, Pool, StudyError, study_config, verdict_of

NAME = "stream"
CLAIM = (
    "In a trained residual Transformer the stream is a running sum: read out through the final norm and "
    "unembedding after each layer (the logit lens), its prediction of the next token improves layer by "
    "layer; each layer's write is small next to the stream it is added to; and the logits are exactly the "
    "sum of every write's direct contribution."
)
REFERENCE = (
    "Elhage et al. 2021 (A Mathematical Framework for Transformer Circuits): the residual stream as a "
    "communication channel, logits as a sum of paths; nostalgebraist 2020 (interpreting GPT: the logit "
    "lens): GPT-2's intermediate streams read out as steadily better guesses of the next token."
)
PROMPTS = (
    "def __init__(self, name):\n        self.name = name\n",
    "import os\nimport sys\n\nfrom collections import defaultdict\n",
    "    for i in range(len(items)):\n        if items[i] is None:\n            return i\n",
)


def get_config() -> ConfigDict:
    return study_config(prompts=PROMPTS)


@jax.jit
def _lens_stats(lens_logits: jax.Array, targets: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Per point: the loss [n_points] and top-1 accuracy [n_points] of lens logits [n_points, 1, seq, vocab]."""
    log_p = jax.nn.log_softmax(lens_logits, axis=-1)
    picked = jnp.take_along_axis(log_p, targets[None, ..., None], axis=-1)[..., 0]
    accuracy = jnp.argmax(lens_logits, axis=-1) == targets[None]
    return -picked.mean(axis=(1, 2)), accuracy.mean(axis=(1, 2))


def measure(config: ConfigDict, pool: Pool) -> Findings:
    trained = pool.train("residual-seed0", train={"seed": config.seeds[0]})
    if trained.diverged:
        raise StudyError(f"the model this study reads diverged in training: {trained.diverged}")
    model, tokenizer, _ = load_run(trained.run_dir)
    n_ctx = config.base.model.n_ctx
    per_prompt = []
    for prompt in config.prompts:
        ids = tokenizer.encode(prompt)[: n_ctx + 1][None]
        per_prompt.append(_prompt_stats(model, ids[:, :-1], ids[:, 1:]))
    labels = per_prompt[0]["points"]
    lens_loss = np.mean([p["lens_loss"] for p in per_prompt], axis=0)
    lens_acc = np.mean([p["lens_acc"] for p in per_prompt], axis=0)
    ratio = np.mean([p["write_over_stream"] for p in per_prompt], axis=0)
    dla = {k: float(np.mean([p["dla"][k] for p in per_prompt])) for k in per_prompt[0]["dla"]}
    exact_error = max(p["dla_error"] for p in per_prompt)
    rows = [
        {"point": label, "lens_loss": float(lens_loss[i]), "lens_top1": float(lens_acc[i])}
        for i, label in enumerate(labels)
    ]
    rows += [{"component": k, "direct_logit_attribution": v} for k, v in dla.items()]
    rows += [
        {"sublayer": k, "write_over_stream": float(v)} for k, v in zip(per_prompt[0]["sublayers"], ratio, strict=True)
    ]
    table = _table(labels, lens_loss, lens_acc, per_prompt[0]["sublayers"], ratio, dla)
    verdict, why = _verdict(lens_loss, labels, ratio, exact_error, model.cfg.n_layers)
    return Findings(
        rows=rows,
        table=table,
        figure=_figure(labels, per_prompt, lens_loss, ratio, dla),
        measured=(
            f"For the {model.cfg.n_layers}-layer residual model ({model.cfg.norm_placement}-LN, trained "
            f"{config.base.train.steps} steps; "
            f"the same model the deletion study trains) on {len(config.prompts)} code prompts: the logit lens "
            "(the stream after each sublayer read through the final norm, recomputed on that stream, and W_U), "
            "scored by its loss on the next token and its top-1 accuracy; each write's norm over the norm of the "
            "stream it is added to (mean over tokens); and each component's direct logit attribution to the "
            "correct next token (mean over positions), from `analysis.logit_attrs`."
        ),
        verdict=verdict,
        why=why,
        extra={"prompts": list(config.prompts), "dla_sum_max_error": exact_error},
    )


def _prompt_stats(model: Any, tokens: np.ndarray, targets: np.ndarray) -> dict[str, Any]:
    logits, cache = model.run_with_cache(tokens)
    lens = analysis.logit_lens(model, cache, mid=True)
    loss, acc = _lens_stats(lens.values, jnp.asarray(targets))
    attrs = analysis.logit_attrs(model, cache, targets)
    correct = np.take_along_axis(np.asarray(logits), targets[..., None], -1)[..., 0]
    sublayers, ratios = [], []
    stream = analysis.accumulated_resid(model, cache, mid=True).values  # [n_sublayers + 1, 1, seq, d_model]
    for k in range(model.cfg.n_sublayers):
        layer, kind = model.cfg.sublayer(k)
        write = token_norm(cache[f"{kind}_out"][layer])
        sublayers.append(f"{layer}_{kind}_out")
        ratios.append(float(jnp.mean(write / jnp.maximum(token_norm(stream[k]), 1e-12))))
    return {
        "points": list(lens.labels),
        "lens_loss": np.asarray(loss),
        "lens_acc": np.asarray(acc),
        "sublayers": sublayers,
        "write_over_stream": np.asarray(ratios),
        "dla": {label: float(jnp.mean(v)) for label, v in attrs},
        "dla_error": float(np.max(np.abs(np.asarray(attrs.sum()) - correct)) / max(1.0, np.abs(correct).max())),
    }


def _table(labels, lens_loss, lens_acc, sublayers, ratio, dla) -> list[dict[str, Any]]:
    """One row per point of the stream: the lens there, the write that produced it and its attribution."""
    table = []
    for i, label in enumerate(labels):
        write = sublayers[i - 1] if 0 < i <= len(sublayers) else ""
        table.append(
            {"stream after": write or ("embeddings" if i == 0 else label), "lens loss": float(lens_loss[i]),
             "lens top-1": float(lens_acc[i]), "write / stream": float(ratio[i - 1]) if write else float("nan"),
             "direct attribution": dla[write] if write else dla["embed"] + dla.get("pos_embed", 0.0)}
        )  # fmt: skip
    return table


def _verdict(lens_loss, labels, ratio, exact_error: float, n_layers: int) -> tuple[str, str]:
    steps = np.diff(lens_loss)
    improving = float(np.mean(steps < 0))
    builds_up = lens_loss[-1] < lens_loss[0] - 0.5 and improving >= 0.6
    small = float(np.median(ratio)) < 1.0
    exact = exact_error < 1e-4
    why = (
        f"The lens loss goes from {lens_loss[0]:.3f} (embeddings) to {lens_loss[-1]:.3f} (final), falling at "
        f"{improving:.0%} of the {len(steps)} sublayers; the median write is {np.median(ratio):.2f} of the "
        f"stream it joins (largest {np.max(ratio):.2f}); the direct attributions sum to the correct-token logit "
        f"to {exact_error:.1e} (relative). Counted as held: the loss falls by more than 0.5 nats and at "
        f"60% or more of the sublayers ({'yes' if builds_up else 'no'}), the median write smaller than the "
        f"stream ({'yes' if small else 'no'}), the sum exact to 1e-4 ({'yes' if exact else 'no'})."
    )
    return verdict_of([builds_up, small, exact]), why


def _figure(labels, per_prompt, lens_loss, ratio, dla) -> Figure:
    fig = Figure(figsize=(15, 4.5))
    ax_lens, ax_norm, ax_dla = fig.subplots(1, 3)
    x = np.arange(len(labels))
    for i, p in enumerate(per_prompt):
        ax_lens.plot(x, p["lens_loss"], alpha=0.4, label=f"prompt {i}")
    ax_lens.plot(x, lens_loss, color="black", marker="o", label="mean")
    ax_lens.set_xticks(x, labels, rotation=90, fontsize="small")
    ax_lens.set(ylabel="loss of the lens readout (nats/token)", title="logit lens: the stream read out at each point")
    ax_lens.legend(fontsize="small")
    subs = per_prompt[0]["sublayers"]
    ax_norm.bar(np.arange(len(subs)), ratio, color=["tab:blue" if "attn" in s else "tab:orange" for s in subs])
    ax_norm.axhline(1.0, color="black", linewidth=0.8)
    ax_norm.set_xticks(np.arange(len(subs)), subs, rotation=90, fontsize="small")
    ax_norm.set(ylabel="|write| / |stream it joins|", title="each write against the stream (blue: attention)")
    names = list(dla)
    ax_dla.bar(np.arange(len(names)), [dla[n] for n in names], color="tab:green")
    ax_dla.axhline(0, color="black", linewidth=0.8)
    ax_dla.set_xticks(np.arange(len(names)), names, rotation=90, fontsize="small")
    ax_dla.set(ylabel="direct logit attribution to the correct token", title="what each component adds to the logit")
    fig.tight_layout()
    return fig
