"""Sharding over a device mesh: data parallel, fully sharded parameters (FSDP), tensor parallel.

The mesh has three named axes, sized from the config (`MeshConfig(data=-1, fsdp=1, tensor=1)`:
-1 takes the devices left over):
- "data": the batch is split over it; parameters are replicated.
- "fsdp": the batch is split over it too, and so are parameters and optimizer state (ZeRO-3): each
  array is split on its largest axis that divides evenly (never the stacked layer axis, which the
  scan slices); XLA gathers a layer's weights where they are used.
- "tensor": attention heads (W_Q, W_K, W_V, W_O and their biases) and the MLP's hidden axis
  (W_in, W_gate, W_out) are split over it (Megatron-style); the batch is not.

Everything is `NamedSharding`s on the state's own pytree, chosen by parameter name, so the same
train step runs on one device or many: `jax.jit` with these shardings lets XLA's SPMD partitioner
insert the collectives.

Activations are pinned too (`constrain`, called inside the model): the residual stream, every write
and every record are split on the batch over data x fsdp, and attention heads and the MLP hidden
axis over tensor. Without that, XLA's propagation follows the FSDP-split weights and splits
activations on d_model instead (the cache came back batch-split over data only, d_model over
fsdp), which is tensor parallelism by accident, not FSDP. The pins apply while a mesh is set
(`jax.set_mesh`): the mesh-compiled train and eval steps (`resstream.train.mesh_steps`) set theirs,
and a model whose parameters are sharded sets theirs when it is called (`mesh_context`), so
analysis needs no code of the user's.

A leaf: this module imports nothing of resstream's but the config.
"""

from __future__ import annotations

import contextlib
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from resstream.config import ConfigError, MeshConfig

AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")
BATCH = P(BATCH_AXES)  # [batch, ...] split over data and fsdp
FREE = P.UNCONSTRAINED  # a dimension left to XLA

# Tensor-parallel axis of each parameter (counted with the leading layer axis of block parameters).
TENSOR_AXIS = {"W_Q": 1, "W_K": 1, "W_V": 1, "b_Q": 1, "b_K": 1, "b_V": 1, "W_O": 1,
               "W_in": 2, "W_gate": 2, "b_in": 1, "b_gate": 1, "W_out": 1}  # fmt: skip
KV_PARAMS = frozenset({"W_K", "W_V", "b_K", "b_V"})  # [n_kv_heads, ...] per layer


def make_mesh(config: MeshConfig, devices: list | None = None) -> Mesh:
    """A ("data", "fsdp", "tensor") mesh over `devices` (default: all, across every process)."""
    devices = jax.devices() if devices is None else devices
    sizes = [config.data, config.fsdp, config.tensor]
    if sizes.count(-1) > 1 or any(s == 0 or s < -1 for s in sizes):
        raise ConfigError(f"mesh sizes {dict(zip(AXES, sizes, strict=True))}: give positive sizes, at most one -1")
    known = int(np.prod([s for s in sizes if s != -1]))
    if -1 in sizes:
        if len(devices) % known:
            raise ConfigError(f"mesh: {len(devices)} devices do not split into fsdp x tensor = {known}")
        sizes[sizes.index(-1)] = len(devices) // known
    if int(np.prod(sizes)) != len(devices):
        raise ConfigError(
            f"mesh {dict(zip(AXES, sizes, strict=True))} needs {int(np.prod(sizes))} devices, but there are "
            f"{len(devices)}: make data x fsdp x tensor equal the device count (use -1 for one axis)"
        )
    return Mesh(np.array(devices).reshape(sizes), AXES)


def param_name(path: tuple) -> str:
    """The parameter's name (W_Q, b_in, ...) from its path in a state pytree: the last dict key
    (an nnx Variable adds a trailing `.value` attribute, and optimizer state wraps it in more)."""
    names = [str(k.key) for k in path if isinstance(k, jax.tree_util.DictKey)]
    return names[-1] if names else ""


def _in_blocks(path: tuple) -> bool:
    return any(isinstance(k, jax.tree_util.DictKey) and str(k.key) == "blocks" for k in path)


def param_spec(path: tuple, shape: tuple[int, ...], mesh: Mesh) -> P:
    """The PartitionSpec of one parameter (or optimizer-state leaf shaped like it), by name."""
    spec: list[Any] = [None] * len(shape)
    tensor, fsdp = mesh.shape["tensor"], mesh.shape["fsdp"]
    name = param_name(path)
    if tensor > 1 and name in TENSOR_AXIS and _in_blocks(path) and len(shape) > TENSOR_AXIS[name]:
        axis = TENSOR_AXIS[name]
        if shape[axis] % tensor == 0:
            spec[axis] = "tensor"
        elif name not in KV_PARAMS:
            raise ConfigError(f"tensor parallelism over {tensor} devices: {name} axis {axis} has size {shape[axis]}")
        # else: fewer key/value heads than tensor devices (multi-query): they are replicated
    if fsdp > 1:
        first = 1 if _in_blocks(path) else 0  # never the stacked layer axis
        free = [a for a in range(first, len(shape)) if spec[a] is None and shape[a] % fsdp == 0]
        if free:
            spec[max(free, key=lambda a: shape[a])] = "fsdp"
    return P(*spec)


def state_shardings(state: Any, mesh: Mesh) -> Any:
    """NamedShardings for a pytree of parameters or a TrainState (optimizer moments follow their
    parameters, by name; scalars are replicated)."""

    def one(path: tuple, leaf: Any) -> NamedSharding:
        shape = np.shape(leaf)
        return NamedSharding(mesh, param_spec(path, shape, mesh) if shape else P())

    return jax.tree_util.tree_map_with_path(one, state)


def shard(tree: Any, shardings: Any) -> Any:
    """`tree` placed on its devices as `shardings` (a matching pytree of NamedShardings)."""
    return jax.device_put(tree, shardings)


def constrain(x: jax.Array, *spec: Any) -> jax.Array:
    """`x` pinned to `PartitionSpec(*spec)` on the mesh that is set (`jax.set_mesh`); unchanged when
    none is. Mesh axes that the mesh lacks, or whose product does not divide their dimension (a
    batch of 1 on 2 devices), are dropped, so that any batch runs."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or mesh.size == 1:
        return x

    def fit(names: Any, size: int) -> Any:
        if names is None or names is FREE:
            return names
        names = tuple(n for n in (names if isinstance(names, tuple) else (names,)) if mesh.shape.get(n, 1) > 1)
        while names and size % int(np.prod([mesh.shape[n] for n in names])):
            names = names[:-1]
        return names or None

    return jax.lax.with_sharding_constraint(x, P(*(fit(n, d) for n, d in zip(spec, x.shape, strict=False))))


def mesh_context(tree: Any) -> contextlib.AbstractContextManager:
    """`jax.set_mesh` of the mesh that the arrays in `tree` are sharded over, so that `constrain`
    applies in what runs under it; a no-op when a mesh is already set, inside a trace, or when the
    arrays live on one device."""
    if not jax.sharding.get_abstract_mesh().empty:
        return contextlib.nullcontext()
    for leaf in jax.tree.leaves(tree):
        if isinstance(leaf, jax.core.Tracer):
            break
        sharding = getattr(leaf, "sharding", None)
        if isinstance(sharding, NamedSharding) and sharding.mesh.size > 1:
            return jax.set_mesh(sharding.mesh)
    return contextlib.nullcontext()
