"""Run by tests/test_sharding.py as two processes on this machine, joined by
`jax.distributed.initialize` over a loopback coordinator (JAX's CPU collectives): the multi-host
path for real. Usage: two_processes.py PORT PROCESS_ID CHECKPOINT_DIR. Each process holds one CPU
device and feeds only its half of every batch; the data-parallel train step runs over both; then
both write one checkpoint together (orbax's collective save). Process 0 prints the losses and a
parameter checksum as JSON."""

import json
import sys

import jax

jax.config.update("jax_num_cpu_devices", 1)
jax.distributed.initialize(coordinator_address=f"127.0.0.1:{sys.argv[1]}", num_processes=2, process_id=int(sys.argv[2]))

import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402
from jax.experimental import multihost_utils  # noqa: E402
from jax.sharding import NamedSharding  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

from resstream import ModelConfig, Transformer  # noqa: E402
from resstream import sharding as S  # noqa: E402, N812
from resstream.checkpoint import Checkpoints  # noqa: E402
from resstream.train import OptimizerConfig, init_state, make_optimizer  # noqa: E402

CFG = ModelConfig(vocab_size=61, n_layers=2, d_model=32, n_heads=4, n_ctx=16, d_mlp=64)
OPTIMIZER = make_optimizer(OptimizerConfig(learning_rate=1e-3, warmup_steps=1, total_steps=10))
STEPS, BATCH = 3, 8

assert jax.process_count() == 2 and len(jax.devices()) == 2 and len(jax.local_devices()) == 1
graphdef, state = init_state(Transformer(CFG, rngs=nnx.Rngs(0)), OPTIMIZER, 0)
mesh = S.make_mesh(S.MeshConfig(data=2))
shardings = S.state_shardings(state, mesh)
state = S.shard(state, shardings)
step = S.sharded_train_step(mesh, shardings, graphdef, OPTIMIZER)
batches = np.asarray(jax.random.randint(jax.random.key(1), (STEPS, 1, BATCH, 17), 0, 61))
half = BATCH // 2
rows = slice(jax.process_index() * half, (jax.process_index() + 1) * half)  # this host's shard only
losses = []
for batch in batches:
    local = batch[:, rows]
    global_batch = jax.make_array_from_process_local_data(
        NamedSharding(mesh, P(None, ("data", "fsdp"))), local, batch.shape
    )
    state, metrics = step(state, global_batch)
    losses.append(float(metrics["loss"]))
params = multihost_utils.process_allgather(state.params, tiled=True)
checksum = {jax.tree_util.keystr(p): float(np.sum(np.abs(np.asarray(x, np.float64))))
            for p, x in jax.tree_util.tree_flatten_with_path(params)[0]}  # fmt: skip
Checkpoints(sys.argv[3]).save(STEPS, state, {"model_config": CFG.to_dict()})
if jax.process_index() == 0:
    print(json.dumps({"losses": losses, "checksum": checksum}))
jax.distributed.shutdown()
