"""The train step: optimizer, train state, one step with telemetry, and evaluation.

The state is plain data (a pytree): parameters, optimizer state, step and RNG key. `optimizer_step`
is the one unjitted step; `train_step` is it compiled for one device, `mesh_steps` compiles it (and
the eval loss) for a device mesh. It runs unchanged on CPU, GPU and TPU, and records in the same
pass (recording mode "stats") the per-layer norms of each write and of the stream, their cosine, and
the gradient norm of each layer's parameters.

A step whose loss or gradients are not finite changes nothing, and neither does any step after it
while `finite_so_far` is threaded from one step's metrics into the next: a training loop can then
check for divergence when it next reads the metrics, without waiting on the device every step.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx, struct
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from resstream.config import OptimizerConfig
from resstream.losses import cross_entropy
from resstream.model import Transformer
from resstream.sharding import BATCH_AXES, param_name


@struct.dataclass
class TrainState:
    """step: optimizer steps taken; params: the model's nnx.Param state; opt_state: optax state;
    rng: a raw uint32[2] key (saved with the checkpoint, so dropout resumes exactly)."""

    step: jax.Array
    params: Any
    opt_state: Any
    rng: jax.Array


def decay_mask(params: Any) -> Any:
    """Weight decay on matrices only: the W_* parameters (the stacked layer axis makes biases 2-D,
    so the test is by name, not by rank)."""
    return jax.tree_util.tree_map_with_path(lambda path, _: param_name(path).startswith("W_"), params)


def learning_rate_schedule(cfg: OptimizerConfig) -> optax.Schedule:
    """Linear warmup from 0 to the peak, then cosine decay to learning_rate * min_lr_ratio."""
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0,
        peak_value=cfg.learning_rate,
        warmup_steps=cfg.warmup_steps,
        decay_steps=max(cfg.total_steps, cfg.warmup_steps + 1),
        end_value=cfg.learning_rate * cfg.min_lr_ratio,
    )


def make_optimizer(cfg: OptimizerConfig) -> optax.GradientTransformation:
    """Global-norm clipping, then AdamW (decay on matrices only) on the schedule."""
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


def layer_norms(tree: Any, n_layers: int) -> jax.Array:
    """L2 norm [n_layers] of each layer's slice of the stacked block parameters in `tree`."""
    squares = [jnp.sum(jnp.square(x.astype(jnp.float32)).reshape(n_layers, -1), axis=1) for x in jax.tree.leaves(tree)]
    return jnp.sqrt(sum(squares))


def _gradients(state: TrainState, batch: jax.Array, graphdef: Any, telemetry: bool) -> tuple:
    """(loss, grads, stats, rng): the mean over batch's accum micro-batches, and the key that the
    next step starts from."""
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
    grads, stats = jax.tree.map(lambda g: g * scale, grads), jax.tree.map(lambda s: s * scale, stats)
    return loss * scale, grads, stats, rng


def optimizer_step(
    state: TrainState,
    batch: jax.Array,
    finite_so_far: jax.Array | bool = True,
    *,
    graphdef: Any,
    optimizer: optax.GradientTransformation,
    telemetry: bool = True,
) -> tuple[TrainState, dict[str, jax.Array]]:
    """One optimizer step on `batch` [accum, batch, seq + 1] (accum micro-batches whose gradients
    are averaged); unjitted. Returns the new state and metrics.

    metrics["finite"]: this step's loss and gradients were finite and so was every step before it
    (`finite_so_far`, pass the previous step's metrics["finite"]). When it is False the state is
    returned unchanged, so a loop may read the flag late: the state is still that of the last good
    step."""
    cfg = nnx.merge(graphdef, state.params).cfg
    loss, grads, stats, rng = _gradients(state, batch, graphdef, telemetry)
    grad_norm = optax.tree.norm(grads)
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm) & finite_so_far

    def apply(state: TrainState) -> TrainState:
        updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        return TrainState(step=state.step + 1, params=params, opt_state=opt_state, rng=rng)

    # A branch, not a select over the whole state: a non-finite step costs no pass over the state.
    new_state = jax.lax.cond(finite, apply, lambda state: state, state)
    metrics = {
        "loss": loss,
        "grad_norm": grad_norm,
        "finite": finite,
        "layer_grad_norm": layer_norms(grads["blocks"], cfg.n_layers),
        "embed_grad_finite": jnp.isfinite(optax.tree.norm({k: v for k, v in grads.items() if k != "blocks"})),
        **{f"layer_{name}": value for name, value in stats.items()},
    }
    return new_state, metrics


def eval_loss_of(params: Any, batch: jax.Array, *, graphdef: Any) -> jax.Array:
    """Mean loss on `batch` [batch, seq + 1] (no dropout); unjitted."""
    model = nnx.merge(graphdef, params)
    return cross_entropy(model(batch[:, :-1]), batch[:, 1:])


# `optimizer_step` compiled for one device, the state donated.
train_step = jax.jit(optimizer_step, static_argnames=("graphdef", "optimizer", "telemetry"), donate_argnums=(0,))
eval_loss = jax.jit(eval_loss_of, static_argnames=("graphdef",))


@dataclasses.dataclass(frozen=True)
class MeshSteps:
    """The train and eval steps compiled for a mesh (each compiles on its first call; keep them).

    train(state, batch [accum, batch, seq + 1], finite_so_far) -> (state, metrics): the state stays
    sharded as given, the batch is split on its batch axis, metrics are replicated.
    evaluate(params, batch [batch, seq + 1]) -> loss."""

    train: Callable[..., tuple[TrainState, dict]]
    evaluate: Callable[[Any, jax.Array], jax.Array]


def mesh_steps(
    mesh: Mesh, state_sharding: Any, graphdef: Any, optimizer: optax.GradientTransformation, telemetry: bool = True
) -> MeshSteps:
    """`optimizer_step` and the eval loss compiled for `mesh`, with `state_sharding` (from
    `sharding.state_shardings`). Both run under the mesh, so the model's activation pins apply."""
    replicated = NamedSharding(mesh, P())
    train = jax.jit(
        functools.partial(optimizer_step, graphdef=graphdef, optimizer=optimizer, telemetry=telemetry),
        in_shardings=(state_sharding, NamedSharding(mesh, P(None, BATCH_AXES)), replicated),
        out_shardings=(state_sharding, replicated),
        donate_argnums=(0,),
    )
    evaluate = jax.jit(
        functools.partial(eval_loss_of, graphdef=graphdef),
        in_shardings=(state_sharding.params, NamedSharding(mesh, P(BATCH_AXES))),
        out_shardings=replicated,
    )

    def train_on_mesh(state: TrainState, batch: jax.Array, finite_so_far: Any = True) -> tuple[TrainState, dict]:
        with jax.set_mesh(mesh):  # traced under the mesh: the model's activation pins apply
            return train(state, batch, finite_so_far)

    def evaluate_on_mesh(params: Any, batch: jax.Array) -> jax.Array:
        with jax.set_mesh(mesh):
            return evaluate(params, batch)

    return MeshSteps(train=train_on_mesh, evaluate=evaluate_on_mesh)
