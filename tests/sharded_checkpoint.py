"""Run by tests/test_sharding.py in a process with 8 CPU devices. `save DIR`: two train steps under
an FSDP mesh, then a checkpoint in DIR/from8 and the parameters in DIR/from8.npz. `restore DIR`:
restore DIR/from1 (written by a 1-device process) onto the FSDP mesh; prints, as JSON, whether the
values equal DIR/from1.npz bit for bit and how W_Q came back sharded."""

import json
import os
import sys
from pathlib import Path

os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"

import jax
import numpy as np
from flax import nnx

from resstream import ModelConfig, Transformer
from resstream import sharding as S  # noqa: N812
from resstream.checkpoint import Checkpoints
from resstream.train import OptimizerConfig, init_state, make_optimizer, mesh_steps

CFG = ModelConfig(vocab_size=61, n_layers=2, d_model=32, n_heads=4, n_ctx=16, d_mlp=64)
OPTIMIZER = make_optimizer(OptimizerConfig(learning_rate=1e-3, warmup_steps=1, total_steps=10))


def leaves(state) -> dict[str, np.ndarray]:
    return {jax.tree_util.keystr(p): np.asarray(x) for p, x in jax.tree_util.tree_flatten_with_path(state)[0]}


def main(command: str, directory: Path) -> None:
    graphdef, state = init_state(Transformer(CFG, rngs=nnx.Rngs(0)), OPTIMIZER, 0)
    mesh = S.make_mesh(S.MeshConfig(data=1, fsdp=8))
    shardings = S.state_shardings(state, mesh)
    state = S.shard(state, shardings)
    if command == "save":
        step = mesh_steps(mesh, shardings, graphdef, OPTIMIZER).train
        for batch in jax.random.randint(jax.random.key(1), (2, 1, 8, 17), 0, 61):
            state, _ = step(state, batch)
        Checkpoints(directory / "from8").save(2, state, {"model_config": CFG.to_dict()})
        np.savez(directory / "from8.npz", **leaves(state))
        print(json.dumps({"saved": True, "W_Q": str(state.params["blocks"]["attn"]["W_Q"].sharding.spec)}))
    else:
        restored, _ = Checkpoints(directory / "from1").restore(state, CFG)
        expected = np.load(directory / "from1.npz")
        got = leaves(restored)
        equal = sorted(got) == sorted(expected.files) and all(np.array_equal(got[k], expected[k]) for k in got)
        spec = str(restored.params["blocks"]["attn"]["W_Q"].sharding.spec)
        print(json.dumps({"equal": bool(equal), "W_Q": spec, "devices": len(jax.devices())}))


if __name__ == "__main__":
    main(sys.argv[1], Path(sys.argv[2]))
