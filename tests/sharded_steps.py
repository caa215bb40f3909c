"""Run by tests/test_sharding.py in a process of its own with 8 CPU devices
(XLA_FLAGS=--xla_force_host_platform_device_count=8, set before JAX starts): a few train steps on
one device and under several meshes; prints, as JSON, the largest differences."""

import json
import os
import sys

os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"

import jax
import numpy as np
from flax import nnx

from resstream import ModelConfig, Transformer
from resstream import sharding as S  # noqa: N812
from resstream.train import OptimizerConfig, init_state, make_optimizer, mesh_steps, train_step

CFG = ModelConfig(vocab_size=61, n_layers=2, d_model=32, n_heads=4, n_ctx=16, d_mlp=64, norm=sys.argv[1])
# b_K's gradient is analytically zero (softmax ignores a shift shared by every key), so Adam turns
# its roundoff, which differs between meshes, into steps that scale with the learning rate: at 1e-2
# they alone reached 1e-5 of the largest parameter; at 1e-3, ~1e-6.
OPTIMIZER = make_optimizer(OptimizerConfig(learning_rate=1e-3, warmup_steps=1, total_steps=10))
BATCHES = jax.random.randint(jax.random.key(1), (4, 2, 8, 17), 0, 61)  # 4 steps of 2 x 8 x (16 + 1)
MESHES = {
    "data": S.MeshConfig(data=8),
    "fsdp": S.MeshConfig(data=1, fsdp=8),
    "data x tensor": S.MeshConfig(data=2, tensor=4),
    "data x fsdp x tensor": S.MeshConfig(data=2, fsdp=2, tensor=2),
}


def train(mesh_config: S.MeshConfig | None) -> tuple[list[float], object, dict]:
    graphdef, state = init_state(Transformer(CFG, rngs=nnx.Rngs(0)), OPTIMIZER, 0)
    if mesh_config is None:
        step = lambda s, b: train_step(s, b, graphdef=graphdef, optimizer=OPTIMIZER)  # noqa: E731
    else:
        mesh = S.make_mesh(mesh_config)
        shardings = S.state_shardings(state, mesh)
        state = S.shard(state, shardings)
        step = mesh_steps(mesh, shardings, graphdef, OPTIMIZER).train
    losses = []
    for batch in BATCHES:
        state, metrics = step(state, batch)
        losses.append(float(metrics["loss"]))
    specs = {
        name: str(getattr(state.params["blocks"][sub][name].sharding, "spec", "one device"))
        for sub, name in (("attn", "W_Q"), ("mlp", "W_in"))
    }
    return losses, state, specs


def relative(a, b) -> float:
    """Largest difference over the whole tree relative to the tree's largest value."""
    a = [np.asarray(x, np.float64) for x in jax.tree.leaves(a)]
    b = [np.asarray(x, np.float64) for x in jax.tree.leaves(b)]
    return max(float(np.max(np.abs(x - y))) for x, y in zip(a, b, strict=True)) / max(
        float(np.max(np.abs(y))) for y in b
    )


reference_losses, reference, _ = train(None)
results = {"devices": len(jax.devices())}
for name, mesh_config in MESHES.items():
    losses, state, specs = train(mesh_config)
    results[name] = {
        "loss": relative(losses, reference_losses),
        "params": relative(state.params, reference.params),
        "opt_state": relative(state.opt_state, reference.opt_state),
        "specs": specs,
    }
print(json.dumps(results))
