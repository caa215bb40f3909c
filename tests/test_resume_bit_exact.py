"""Exact resume at XLA's default optimisation level. conftest.py turns LLVM's optimisation passes off
for the whole session (and xla_env() hands that on to subprocesses), so every other exactness test
runs at -O0; vectorised code at the default level is what a user's training run executes."""

from pathlib import Path

import pytest

from conftest import json_report, xla_env

ROOT = Path(__file__).resolve().parent.parent

# The loop's resume path: init_state and shard (the restore target), Checkpoints.save / .restore,
# and the mesh-compiled train step (one device). At the default level every compile runs LLVM's
# passes, the step's and the model's random init's (many threefry kernels) alike, so the parameters
# are drawn with numpy into an abstract model: one slow compile instead of two.
SCRIPT = """
import json, sys
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from resstream import ModelConfig, Transformer
from resstream.checkpoint import Checkpoints
from resstream.config import MeshConfig, OptimizerConfig
from resstream.sharding import make_mesh, shard, state_shardings
from resstream.train import init_state, make_optimizer, mesh_steps

cfg = ModelConfig(vocab_size=61, n_layers=2, d_model=32, n_heads=4, n_ctx=16)
optimizer = make_optimizer(OptimizerConfig(learning_rate=1e-2, warmup_steps=1, total_steps=10))
batches = np.random.default_rng(1).integers(0, 61, (4, 1, 4, 17)).astype(np.int32)
mesh = make_mesh(MeshConfig())

def fresh():
    graphdef, abstract = nnx.split(nnx.eval_shape(lambda: Transformer(cfg, rngs=nnx.Rngs(0))))
    draw = np.random.default_rng(0)
    params = jax.tree.map(lambda a: jnp.asarray(draw.normal(0, 0.1, a.shape).astype(a.dtype)), abstract)
    graphdef, state = init_state(nnx.merge(graphdef, params), optimizer, 0)
    shardings = state_shardings(state, mesh)
    return graphdef, shard(state, shardings), shardings

graphdef, state, shardings = fresh()
steps = mesh_steps(mesh, shardings, graphdef, optimizer)

def train(state, batches):
    losses, finite = [], True
    for batch in batches:
        state, metrics = steps.train(state, batch, finite)
        finite = metrics["finite"]
        losses.append(np.asarray(metrics["loss"]).tobytes().hex())
    assert bool(finite)
    return state, losses

straight, straight_losses = train(state, batches)
state, losses = train(fresh()[1], batches[:2])
with Checkpoints(sys.argv[1]) as checkpoints:
    checkpoints.save(2, state, {"model_config": cfg.to_dict()})
    state, _ = checkpoints.restore(fresh()[1], cfg)
resumed, more = train(state, batches[2:])
pairs = zip(jax.tree_util.tree_leaves_with_path(straight), jax.tree.leaves(resumed), strict=True)
print(json.dumps({
    "flags": __import__("os").environ.get("XLA_FLAGS", ""),
    "losses_equal": straight_losses == losses + more,
    "differ": [jax.tree_util.keystr(path) for (path, a), b in pairs if not np.array_equal(a, b)],
    "leaves": len(jax.tree.leaves(straight)),
}))
"""


@pytest.mark.slow
def test_resumed_training_is_bit_identical_at_the_default_optimisation_level(tmp_path):
    """4 train steps straight give the same losses and state, bit for bit, as 2 steps, a
    save and restore through Checkpoints, then 2 more, compiled at XLA's default -O level."""
    report = json_report(["-c", SCRIPT, str(tmp_path / "checkpoints")], xla_env(optimised=True), 300, cwd=ROOT)
    assert "optimization_level" not in report["flags"]
    assert report["leaves"] > 10 and report["differ"] == [], report
    assert report["losses_equal"]
