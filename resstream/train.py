"""The train step: optimizer, train state, one jitted step with telemetry, and evaluation.

The state is plain data (a pytree): parameters, optimizer state, step and RNG key. The step is
compiled once with the state donated, runs unchanged on CPU, GPU and TPU, and records in the same
pass (recording mode "stats") the per-layer norms of each write and of the stream, their cosine,
and the gradient norm of each layer's parameters.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx, struct

from resstream.model import Transformer


@struct.dataclass
class TrainState:
    """step: optimizer steps taken; params: the model's nnx.Param state; opt_state: optax state;
    rng: a raw uint32[2] key (saved with the checkpoint, so dropout resumes exactly)."""

    step: jax.Array
    params: Any
    opt_state: Any
    rng: jax.Array


@struct.dataclass
class OptimizerConfig:
    learning_rate: float = 1e-3
    warmup_steps: int = 100
    total_steps: int = 1000
    min_lr_ratio: float = 0.1  # the cosine decays to learning_rate * min_lr_ratio
    weight_decay: float = 0.1
    b1: float = 0.9
    b2: float = 0.95
    grad_clip: float = 1.0


def decay_mask(params: Any) -> Any:
    """Weight decay on matrices only: the W_* parameters (the stacked layer axis makes biases 2-D,
    so the test is by name, not by rank)."""

    def is_matrix(path: tuple, _: Any) -> bool:
        # the parameter's name is the last dict key (a Variable adds a trailing `.value` attribute)
        names = [str(k.key) for k in path if isinstance(k, jax.tree_util.DictKey)]
        return bool(names) and names[-1].startswith("W_")

    return jax.tree_util.tree_map_with_path(is_matrix, params)


def learning_rate_schedule(cfg: OptimizerConfig) -> optax.Schedule:
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0,
        peak_value=cfg.learning_rate,
        warmup_steps=cfg.warmup_steps,
        decay_steps=max(cfg.total_steps, cfg.warmup_steps + 1),
        end_value=cfg.learning_rate * cfg.min_lr_ratio,
    )


def make_optimizer(cfg: OptimizerConfig) -> optax.GradientTransformation:
    return optax.chain(
        optax.clip_by_global_norm(cfg.grad_clip),
        optax.adamw(learning_rate_schedule(cfg), b1=cfg.b1, b2=cfg.b2, weight_decay=cfg.weight_decay, mask=decay_mask),
    )


def init_state(model: Transformer, optimizer: optax.GradientTransformation, seed: int) -> tuple[Any, TrainState]:
    """(graphdef, state) for a freshly initialised model."""
    graphdef, params = nnx.split(model, nnx.Param)
    state = TrainState(
        step=jnp.zeros((), jnp.int32), params=params, opt_state=optimizer.init(params), rng=jax.random.PRNGKey(seed)
    )
    return graphdef, state


def cross_entropy(logits: jax.Array, targets: jax.Array) -> jax.Array:
    """Mean next-token loss in nats; logits [batch, seq, vocab] float32, targets [batch, seq]."""
    return optax.softmax_cross_entropy_with_integer_labels(logits, targets).mean()


def layer_norms(tree: Any, n_layers: int) -> jax.Array:
    """L2 norm [n_layers] of each layer's slice of the stacked block parameters in `tree`."""
    squares = [jnp.sum(jnp.square(x.astype(jnp.float32)).reshape(n_layers, -1), axis=1) for x in jax.tree.leaves(tree)]
    return jnp.sqrt(sum(squares))


@functools.partial(jax.jit, static_argnames=("graphdef", "optimizer", "telemetry"), donate_argnums=(0,))
def train_step(
    state: TrainState,
    batch: jax.Array,
    *,
    graphdef: Any,
    optimizer: optax.GradientTransformation,
    telemetry: bool = True,
) -> tuple[TrainState, dict[str, jax.Array]]:
    """One optimizer step on `batch` [accum, batch, seq + 1] (accum micro-batches whose gradients
    are averaged). Returns the new state and metrics; when the loss or any gradient is not finite
    the state is returned unchanged and metrics["finite"] is False."""
    cfg = nnx.merge(graphdef, state.params).cfg
    rng, step_rng = jax.random.split(state.rng)
    stochastic = cfg.dropout > 0 or cfg.stochastic_depth > 0
    mode = "stats" if telemetry else "off"

    def loss_fn(params: Any, micro: jax.Array, key: jax.Array) -> tuple[jax.Array, dict]:
        model = nnx.merge(graphdef, params)
        logits, stats = model.run_with_cache(micro[:, :-1], mode=mode, rng=key if stochastic else None)
        return cross_entropy(logits, micro[:, 1:]), stats

    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
    keys = jax.random.split(step_rng, batch.shape[0])

    def accumulate(carry: tuple, xs: tuple) -> tuple[tuple, None]:
        loss_sum, grad_sum, stats_sum = carry
        (loss, stats), grads = grad_fn(state.params, *xs)
        add = functools.partial(jax.tree.map, jnp.add)
        return (loss_sum + loss, add(grad_sum, grads), add(stats_sum, stats)), None

    (loss, stats), grads = grad_fn(state.params, batch[0], keys[0])
    if batch.shape[0] > 1:
        (loss, grads, stats), _ = jax.lax.scan(accumulate, (loss, grads, stats), (batch[1:], keys[1:]))
    scale = 1.0 / batch.shape[0]
    loss = loss * scale
    grads, stats = jax.tree.map(lambda g: g * scale, grads), jax.tree.map(lambda s: s * scale, stats)

    grad_norm = optax.tree.norm(grads)
    layer_grad_norm = layer_norms(grads["blocks"], cfg.n_layers)
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
    updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    new_state = TrainState(step=state.step + 1, params=params, opt_state=opt_state, rng=rng)
    # A non-finite step changes nothing: the state stays at the last good step.
    new_state = jax.tree.map(lambda new, old: jnp.where(finite, new, old), new_state, state)
    metrics = {
        "loss": loss,
        "grad_norm": grad_norm,
        "finite": finite,
        "layer_grad_norm": layer_grad_norm,
        "embed_grad_finite": jnp.isfinite(optax.tree.norm({k: v for k, v in grads.items() if k != "blocks"})),
        **{f"layer_{name}": value for name, value in stats.items()},
    }
    return new_state, metrics


@functools.partial(jax.jit, static_argnames=("graphdef",))
def eval_loss(params: Any, batch: jax.Array, *, graphdef: Any) -> jax.Array:
    """Mean loss on `batch` [batch, seq + 1] (no dropout)."""
    model = nnx.merge(graphdef, params)
    return cross_entropy(model(batch[:, :-1]), batch[:, 1:])
