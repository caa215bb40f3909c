"""Run by tests/test_sharding.py in a process with 8 CPU devices: the same model with its
parameters sharded over a data x fsdp x tensor = 2 x 2 x 2 mesh and its tokens split over the
batch, against the model on one device. Prints, as JSON, the largest relative differences of the
forward pass, the cache, the decomposition, an ablation sweep and a patching grid, the last two
also as a deep model runs them (in cohorts through one loop over the layers); and the bytes each
device holds of the sharded parameters, as `resstream.memory` counts them."""

import json
import math
import os

os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"

import jax
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from resstream import ModelConfig, Transformer, analysis, lane_plan, memory, patching
from resstream import ablation as A  # noqa: N812
from resstream import sharding as S  # noqa: N812

CFG = ModelConfig(vocab_size=61, n_layers=2, d_model=32, n_heads=4, n_ctx=16, d_mlp=64)


def relative(a, b) -> float:
    a = [np.asarray(x, np.float64) for x in jax.tree.leaves(a)]
    b = [np.asarray(x, np.float64) for x in jax.tree.leaves(b)]
    return max(float(np.max(np.abs(x - y))) for x, y in zip(a, b, strict=True)) / max(
        float(np.max(np.abs(y))) for y in b
    )


def study(model: Transformer, tokens: jax.Array) -> dict:
    logits, cache = model.run_with_cache(tokens)
    corrupted = tokens[:, ::-1]
    return {
        "logits": logits,
        "cache": {k: cache[k] for k in ("attn_out", "mlp_out", "z", "resid_final")},
        "decompose_logits": analysis.decompose_logits(model, cache).values,
        "logit_lens": analysis.logit_lens(model, cache).values,
        "sweep": A.ablation_sweep(model, tokens, "heads").loss,
        "patching": patching.patch_resid(model, tokens, corrupted, tokens[:, -1], corrupted[:, -1]).logit_diff,
        **in_cohorts(model, tokens[:, :12]),  # a length of its own: nothing traced unrolled is reused
    }


def in_cohorts(model: Transformer, tokens: jax.Array) -> dict:
    """The sweep and the patching grid with every model taken as deep (UNROLLED_LAYERS = 1)."""
    unrolled, lane_plan.UNROLLED_LAYERS = lane_plan.UNROLLED_LAYERS, 1
    memory._compiled.clear()
    try:
        corrupted = tokens[:, ::-1]
        return {
            "sweep in cohorts": A.ablation_sweep(model, tokens, "heads").loss,
            "patching in cohorts": patching.patch_resid(
                model, tokens, corrupted, tokens[:, -1], corrupted[:, -1]
            ).logit_diff,
        }
    finally:
        lane_plan.UNROLLED_LAYERS = unrolled
        memory._compiled.clear()


tokens = jax.random.randint(jax.random.key(1), (4, 16), 0, CFG.vocab_size)
single = Transformer(CFG, rngs=nnx.Rngs(0))
expected = study(single, tokens)

mesh = S.make_mesh(S.MeshConfig(data=2, fsdp=2, tensor=2))
sharded = Transformer(CFG, rngs=nnx.Rngs(0))
params = nnx.state(sharded, nnx.Param)
nnx.update(sharded, S.shard(params, S.state_shardings(params, mesh)))
got = study(sharded, jax.device_put(tokens, NamedSharding(mesh, P(("data", "fsdp")))))
result = {name: relative(got[name], expected[name]) for name in expected}
result["W_Q"] = str(sharded.blocks.attn.W_Q[...].sharding.spec)
logits, cache = sharded.run_with_cache(jax.device_put(tokens, NamedSharding(mesh, P(("data", "fsdp")))))
result["specs"] = {name: str(x.sharding.spec) for name, x in {"logits": logits, **cache}.items()}
# memory.room_now on the sharded parameters: each device holds its shards (shapes from the
# shardings), and the room is the tightest device's free bytes (stubbed) plus what it holds.
leaves = jax.tree.leaves(params)
result["resident"] = [
    [memory.resident_bytes(leaves, d), sum(math.prod(x.sharding.shard_shape(x.shape)) * x.itemsize for x in leaves)]
    for d in jax.devices()
]
memory.free_device_memory = lambda device: 1000 * (1 + device.id % 3)
result["room"] = [memory.room_now(leaves), 1000 + memory.resident_bytes(leaves, jax.devices()[3])]
print(json.dumps(result))
