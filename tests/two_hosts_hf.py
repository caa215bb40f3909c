"""Run by tests/test_hf.py as one of two processes joined by jax.distributed (one CPU device each):
a model sharded across both hosts (FSDP over 2) saved with `hf.save` to DIR/export, then saved
again to the same path, which must be refused on both hosts. Prints, as JSON, whether a parameter
was sharded across hosts, and the second save's error."""

import json
import sys
from pathlib import Path

import jax
from flax import nnx

from resstream import ModelConfig, Transformer, hf
from resstream import sharding as S  # noqa: N812
from resstream.data import ByteTokenizer

CFG = ModelConfig(vocab_size=256, n_layers=2, d_model=32, n_heads=4, n_ctx=16, d_mlp=64, unembed_bias=False)


def main(process_id: int, port: int, directory: Path) -> None:
    jax.distributed.initialize(coordinator_address=f"127.0.0.1:{port}", num_processes=2, process_id=process_id)
    graphdef, state = nnx.split(Transformer(CFG, rngs=nnx.Rngs(0)))
    mesh = S.make_mesh(S.MeshConfig(data=1, fsdp=2))
    model = nnx.merge(graphdef, S.shard(state, S.state_shardings(state, mesh)))
    across_hosts = not model.blocks.attn.W_Q[...].is_fully_addressable
    hf.save(model, ByteTokenizer(), directory / "export")
    try:
        hf.save(model, ByteTokenizer(), directory / "export")
        again = None
    except hf.HFError as err:
        again = str(err)
    print(json.dumps({"across_hosts": across_hosts, "again": again}))


if __name__ == "__main__":
    main(int(sys.argv[1]), int(sys.argv[2]), Path(sys.argv[3]))
