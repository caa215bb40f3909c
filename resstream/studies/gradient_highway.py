"""The gradient highway: with identity connections the gradient reaches early layers undiminished
(dL/dx_l = dL/dx_{l+1} (1 + dF/dx_l)); pre-LN keeps the layers' gradients balanced, post-LN's grow
toward the output (Xiong et al. 2020)."""

from __future__ import annotations

import functools
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from matplotlib.figure import Figure
from ml_collections import ConfigDict

from resstream.losses import cross_entropy
from resstream.model import Transformer
from resstream.studies.common import Findings, Pool, Trained, fixed_batches, rank_correlation, study_config, verdict_of
from resstream.train import layer_norms

NAME = "gradient-highway"
CLAIM = (
    "Without the identity path the gradient reaching a layer's input shrinks (or grows) geometrically with "
    "the layers above it; with it, dL/dx_l = dL/dx_{l+1} (1 + dF_l/dx_l) carries the gradient down "
    "undiminished. Among residual Transformers, pre-LN keeps the layers' parameter gradients balanced at "
    "initialisation, while post-LN's grow toward the output."
)
REFERENCE = (
    "He et al. 2016b (Identity Mappings in Deep Residual Networks), eq. 5; Xiong et al. 2020 (On Layer "
    "Normalization in the Transformer Architecture), Theorem 1 and Fig. 3: at initialisation the gradient of "
    "post-LN's last layer is O(d sqrt(ln d)) and grows with the layer index, while pre-LN's is scaled by "
    "1/sqrt(L) and is the same for every layer."
)
VARIANTS = {
    "pre-LN residual": {"norm_placement": "pre", "residual": True},
    "post-LN residual": {"norm_placement": "post", "residual": True},
    "pre-LN plain": {"norm_placement": "pre", "residual": False},
    "post-LN plain": {"norm_placement": "post", "residual": False},
}


def get_config() -> ConfigDict:
    config = study_config(n_layers=16, batches=4, checkpoints=4)
    config.base.model.update(d_model=32, n_ctx=32)
    config.base.train.update(steps=300, eval_every=300)
    return config


@functools.partial(jax.jit, static_argnames="graphdef")
def gradient_norms(state: nnx.State, tokens: jax.Array, *, graphdef: nnx.GraphDef) -> dict[str, jax.Array]:
    """The loss on `tokens` [batch, seq + 1] (next-token prediction) and the norms of its gradients:
    "stream" [n_layers + 1], of dL/dx at the stream entering each layer and at the final stream
    (the Frobenius norm over [batch, seq, d_model]); "params" [n_layers], of each layer's parameters.

    The stream gradient is the gradient with respect to a zero offset added to the stream at each of
    those points, in a forward pass that is the model's own (the same embed, blocks and unembed)."""
    model = nnx.merge(graphdef, state)
    cfg = model.cfg
    inputs, targets = tokens[:, :-1], tokens[:, 1:]
    stream = model.embed(inputs)
    rope = model.rope(inputs.shape[1])
    block_graphdef = nnx.graphdef(model.blocks)

    def loss_fn(params: nnx.State, offsets: jax.Array) -> jax.Array:
        blocks = nnx.state(nnx.merge(graphdef, params).blocks)

        def body(resid: jax.Array, xs: tuple) -> tuple[jax.Array, None]:
            layer_state, offset = xs
            layer = nnx.merge(block_graphdef, layer_state)
            return layer(stream.replace(resid=resid + offset, records={}), rope).resid, None

        resid, _ = jax.lax.scan(body, stream.resid, (blocks, offsets[:-1]))
        logits, _ = nnx.merge(graphdef, params).unembed(resid + offsets[-1])
        return cross_entropy(logits, targets)

    offsets = jnp.zeros((cfg.n_layers + 1, *stream.resid.shape), stream.resid.dtype)
    loss, (param_grads, offset_grads) = jax.value_and_grad(loss_fn, argnums=(0, 1))(state, offsets)
    stream_norms = jnp.sqrt(jnp.sum(jnp.square(offset_grads.astype(jnp.float32)), axis=(1, 2, 3)))
    return {"loss": loss, "stream": stream_norms, "params": layer_norms(param_grads["blocks"], cfg.n_layers)}


def _measure_at(trained: Trained, step: int | None, batches: list[np.ndarray], seed: int) -> dict[str, np.ndarray]:
    """Mean gradient norms over `batches`, of the model at checkpoint `step` (None: at initialisation)."""
    if step is None:
        from resstream.config import model_config

        model = Transformer(model_config(trained.config), rngs=nnx.Rngs(seed))  # the run's own initialisation
    else:
        model = trained.model(step)
    graphdef, state = nnx.split(model)
    norms = [gradient_norms(state, jnp.asarray(b), graphdef=graphdef) for b in batches]
    return {k: np.mean([np.asarray(n[k]) for n in norms], axis=0) for k in norms[0]}


def measure(config: ConfigDict, pool: Pool) -> Findings:
    steps, n_layers = config.base.train.steps, config.n_layers
    every = max(1, steps // config.checkpoints)
    measured_steps = sorted({*range(every, steps + 1, every), steps})  # the last step is always checkpointed
    batches = fixed_batches(config.base, "validation", config.batches)
    rows: list[dict[str, Any]] = []
    logs = {}
    seed = config.seeds[0]
    for variant, model in VARIANTS.items():
        trained = pool.train(
            variant.replace(" ", "-") + f"-L{n_layers}",
            model={**model, "n_layers": n_layers},
            train={"seed": seed, "checkpoint_every": every, "keep_last": len(measured_steps) + 1},
        )
        logs[variant] = [(r["step"], r["layer_grad_norm"]) for r in trained.log() if "layer_grad_norm" in r]
        for step in [None, *measured_steps]:
            if trained.diverged and step is not None:
                break
            norms = _measure_at(trained, step, batches, seed)
            for layer in range(n_layers + 1):
                rows.append(
                    {"variant": variant, "step": step or 0, "layer": layer, "loss": float(norms["loss"]),
                     "stream_grad_norm": float(norms["stream"][layer]),
                     "param_grad_norm": float(norms["params"][layer]) if layer < n_layers else float("nan")}
                )  # fmt: skip
    table = _table(rows, n_layers)
    verdict, why = _verdict(table)
    return Findings(
        rows=rows,
        table=table,
        figure=_figure(rows, logs, n_layers, steps),
        measured=(
            f"Gradient norms of {n_layers}-layer models, on {config.batches} validation batches of "
            f"{config.base.train.batch_size} x {config.base.model.n_ctx} bytes, at initialisation and at "
            f"checkpoints every {every} steps of training: the norm of dL/dx at the stream entering each layer "
            "(layer n_layers: the final stream) and of each layer's parameter gradient. In the table, "
            "'stream first/last' is |dL/dx_0| / |dL/dx_L| (1: the gradient reaches the first layer undiminished) "
            "and 'params last/first' the last layer's parameter gradient over the first's; 'params trend' is the "
            "rank correlation of the parameter gradient with the layer index (+1: grows toward the output)."
        ),
        verdict=verdict,
        why=why,
    )


def _table(rows: list[dict[str, Any]], n_layers: int) -> list[dict[str, Any]]:
    table = []
    for variant in VARIANTS:
        for step in sorted({r["step"] for r in rows if r["variant"] == variant}):
            mine = sorted((r for r in rows if r["variant"] == variant and r["step"] == step), key=lambda r: r["layer"])
            stream = [r["stream_grad_norm"] for r in mine]
            params = [r["param_grad_norm"] for r in mine[:n_layers]]
            table.append(
                {"variant": variant, "step": step, "loss": mine[0]["loss"],
                 "stream first/last": _ratio(stream[0], stream[-1]),
                 "params last/first": _ratio(params[-1], params[0]),
                 "params max/min": _ratio(max(params), min(params)),
                 "params trend": rank_correlation(range(n_layers), params)}
            )  # fmt: skip
    return table


def _ratio(a: float, b: float) -> float:
    """a / b, infinite where a gradient vanished to exactly 0 in float32 (NaN if both did)."""
    return a / b if b else (math.inf if a else math.nan)


def _verdict(table: list[dict[str, Any]]) -> tuple[str, str]:
    at_init = {r["variant"]: r for r in table if r["step"] == 0}
    ratio = {v: r["stream first/last"] for v, r in at_init.items()}
    highway = 0.1 <= ratio["pre-LN residual"] <= 10  # the pure identity path (post-LN's passes through norms)
    plain_fails = all(not 0.1 <= ratio[v] <= 10 for v in ("pre-LN plain", "post-LN plain"))
    pre, post = at_init["pre-LN residual"], at_init["post-LN residual"]
    balanced = pre["params max/min"] <= 4
    grows = post["params trend"] > 0.5 and post["params last/first"] > pre["params last/first"]
    held = [highway, plain_fails, balanced, grows]
    why = (
        "At initialisation, |dL/dx_0| / |dL/dx_L|: "
        + ", ".join(f"{v} {r:.3g}" for v, r in ratio.items())
        + " (the identity path holds it within 0.1-10: "
        + f"{'yes' if highway else 'no'} for pre-LN residual, {'no' if plain_fails else 'yes'} for plain; post-LN's "
        + "residual path passes through every norm, so it is not an identity path). "
        + f"Pre-LN's layer parameter gradients span a factor {pre['params max/min']:.3g} (balanced, <= 4: "
        + f"{'yes' if balanced else 'no'}); post-LN's last/first ratio is {post['params last/first']:.3g} against "
        + f"pre-LN's {pre['params last/first']:.3g}, trend with depth {post['params trend']:+.2f} (grows toward "
        + f"the output: {'yes' if grows else 'no'})."
    )
    return verdict_of(held), why


def _figure(rows: list[dict[str, Any]], logs: dict, n_layers: int, steps: int) -> Figure:
    fig = Figure(figsize=(12, 8))
    axes = fig.subplots(2, 2)
    last_step = max(r["step"] for r in rows)
    panels = [
        (axes[0, 0], "stream_grad_norm", 0, "|dL/dx| entering each layer, at initialisation"),
        (axes[0, 1], "param_grad_norm", 0, "layer parameter gradient norm, at initialisation"),
        (axes[1, 0], "stream_grad_norm", last_step, f"|dL/dx| entering each layer, after {last_step} steps"),
    ]
    for ax, key, step, title in panels:
        for variant in VARIANTS:
            mine = sorted((r for r in rows if r["variant"] == variant and r["step"] == step), key=lambda r: r["layer"])
            if mine:
                ax.plot([r["layer"] for r in mine], [r[key] for r in mine], marker=".", label=variant)
        ax.set_yscale("log")
        ax.set_xlabel(f"layer ({n_layers}: the final stream)" if key == "stream_grad_norm" else "layer")
        ax.set_title(title, fontsize="medium")
    ax = axes[1, 1]
    for variant, log in logs.items():
        if log:
            steps_logged = [s for s, _ in log]
            norms = np.asarray([g for _, g in log])
            (line,) = ax.plot(steps_logged, norms[:, -1], label=f"{variant}: last layer")
            ax.plot(steps_logged, norms[:, 0], linestyle="--", color=line.get_color())
    ax.set_yscale("log")
    ax.set_xlabel("training step")
    ax.set_title("parameter gradient norm in training (solid: last layer, dashed: first)", fontsize="medium")
    axes[0, 0].legend(fontsize="small")
    ax.legend(fontsize="x-small")
    fig.tight_layout()
    return fig
