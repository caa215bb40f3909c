"""Scale benchmark: the train step's compiled memory under each rematerialisation policy, and on an
accelerator, tokens/s and model FLOPs utilisation (MFU).

    python benchmarks/scale.py [--batch 8 32] [--dtype bfloat16] [--steps 10] [--telemetry]

1. Memory (any platform; nothing is allocated: the step is lowered from abstract shapes and
   compiled, and XLA's `memory_analysis()` reports the buffers it planned). At 12 layers, d_model
   768, 12 heads, context 1024 (vocab 256, bytes), for remat "none", "dots" and "full": the
   temporary (activation) bytes, argument and output bytes, and each policy's temporaries as a
   ratio of "none"'s. Expected order: none > dots > full.
2. Throughput (only when the default backend is a GPU or TPU): the same model in `--dtype` compute
   with float32 parameters and optimizer state, tokens/s and MFU against the device's peak from
   PEAK_FLOPS (dense bf16), for each remat policy and each `--batch`; with `--telemetry` also the
   step the training loop runs by default (per-layer residual-stream statistics recorded).
   FLOPs per token as in benchmarks/train_throughput.py (6 x matmul parameters + 12 x layers x
   seq x d_model for attention, counted without the causal half, the usual MFU convention).
3. Sharded memory (when there is more than one device; on CPU run it with
   XLA_FLAGS=--xla_force_host_platform_device_count=8): the per-device compiled memory of the step
   under data, fsdp and data x fsdp x tensor meshes (remat "dots"), with the model's activation
   pins (traced under the mesh, as `train.mesh_steps` runs it) and without them (XLA's
   propagation alone). FSDP should divide the arguments (parameters and Adam state) by its size.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import statistics
import time

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
from train_throughput import flops_per_token

from resstream import ModelConfig, Transformer
from resstream import sharding as S  # noqa: N812
from resstream.train import OptimizerConfig, init_state, make_optimizer, optimizer_step, train_step

# Dense bf16 peak FLOP/s by device kind (vendor datasheets, without sparsity).
PEAK_FLOPS = {
    "NVIDIA H100 80GB HBM3": 989e12,  # SXM
    "NVIDIA H100 PCIe": 756e12,
    "NVIDIA H100 NVL": 835e12,
    "NVIDIA H100": 989e12,
    "NVIDIA H200": 989e12,
    "NVIDIA A100-SXM4-80GB": 312e12,
    "NVIDIA A100-SXM4-40GB": 312e12,
    "TPU v4": 275e12,
    "TPU v5 lite": 197e12,
    "TPU v5e": 197e12,
    "TPU v5p": 459e12,
}


def config(remat: str, dtype: str) -> ModelConfig:
    return ModelConfig(
        vocab_size=256,
        n_layers=12,
        d_model=768,
        n_heads=12,
        n_ctx=1024,
        remat=remat,
        dtype=dtype,
        param_dtype="float32",
    )


def compiled_memory(remat: str, batch: int, dtype: str) -> dict[str, float]:
    cfg = config(remat, dtype)
    optimizer = make_optimizer(OptimizerConfig(total_steps=10_000))
    graphdef, state = nnx.eval_shape(lambda: init_state(Transformer(cfg, rngs=nnx.Rngs(0)), optimizer, 0))
    tokens = jax.ShapeDtypeStruct((1, batch, cfg.n_ctx + 1), jnp.int32)
    start = time.perf_counter()
    compiled = train_step.lower(state, tokens, graphdef=graphdef, optimizer=optimizer, telemetry=False).compile()
    seconds = time.perf_counter() - start
    memory = compiled.memory_analysis()
    return {
        "temp_bytes": memory.temp_size_in_bytes,
        "argument_bytes": memory.argument_size_in_bytes,
        "output_bytes": memory.output_size_in_bytes,
        "compile_s": seconds,
    }


def sharded_memory(mesh_config: S.MeshConfig, batch: int, dtype: str, pinned: bool) -> dict[str, float]:
    """Per-device compiled memory of the step on `mesh_config`'s mesh over all devices."""
    cfg = config("dots", dtype)
    optimizer = make_optimizer(OptimizerConfig(total_steps=10_000))
    graphdef, state = nnx.eval_shape(lambda: init_state(Transformer(cfg, rngs=nnx.Rngs(0)), optimizer, 0))
    mesh = S.make_mesh(mesh_config)
    shardings = S.state_shardings(state, mesh)
    step = jax.jit(
        functools.partial(optimizer_step, graphdef=graphdef, optimizer=optimizer, telemetry=False),
        in_shardings=(shardings, NamedSharding(mesh, P(None, S.BATCH_AXES))),
        out_shardings=(shardings, NamedSharding(mesh, P())),
        donate_argnums=(0,),
    )
    tokens = jax.ShapeDtypeStruct((1, batch, cfg.n_ctx + 1), jnp.int32)
    with jax.set_mesh(mesh) if pinned else contextlib.nullcontext():
        memory = step.lower(state, tokens).compile().memory_analysis()
    return {"temp_bytes": memory.temp_size_in_bytes, "argument_bytes": memory.argument_size_in_bytes}


def throughput(remat: str, batch: int, dtype: str, steps: int, telemetry: bool) -> dict[str, float]:
    cfg = config(remat, dtype)
    optimizer = make_optimizer(OptimizerConfig(total_steps=10_000))
    graphdef, state = init_state(Transformer(cfg, rngs=nnx.Rngs(0)), optimizer, 0)
    tokens = jax.random.randint(jax.random.key(0), (1, batch, cfg.n_ctx + 1), 0, cfg.vocab_size)
    times = []
    for i in range(steps + 2):  # the first two (compile, warm-up) not counted
        start = time.perf_counter()
        state, metrics = train_step(state, tokens, graphdef=graphdef, optimizer=optimizer, telemetry=telemetry)
        jax.block_until_ready(metrics["loss"])
        if i >= 2:
            times.append(time.perf_counter() - start)
    step = statistics.median(times)
    per_second = batch * cfg.n_ctx / step
    return {"step_ms": 1e3 * step, "tokens_per_s": per_second, "flops": flops_per_token(cfg, cfg.n_ctx) * per_second}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, nargs="+", default=[8], help="memory at the first; throughput at each")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--telemetry", action="store_true", help="also time the step with telemetry on")
    args = parser.parse_args()
    device = jax.devices()[0]
    print(f"jax {jax.__version__} on {device.device_kind} ({jax.default_backend()})")
    print(f"12 layers x d_model 768 x 12 heads, context 1024, batch {args.batch[0]}, compute {args.dtype}")
    print(f"{'remat':6} {'temporaries':>12} {'vs none':>8} {'arguments':>10} {'outputs':>9} {'compile':>8}")
    memory = {remat: compiled_memory(remat, args.batch[0], args.dtype) for remat in ("none", "dots", "full")}
    for remat, m in memory.items():
        print(
            f"{remat:6} {m['temp_bytes'] / 2**30:10.2f}GiB {m['temp_bytes'] / memory['none']['temp_bytes']:8.3f} "
            f"{m['argument_bytes'] / 2**30:8.2f}GiB {m['output_bytes'] / 2**30:7.2f}GiB {m['compile_s']:7.1f}s"
        )
    n = jax.device_count()
    if n > 1 and n % 8 == 0:
        print(f"\nper device, {n} devices, remat dots, batch {args.batch[0]}: pinned activations vs XLA's propagation")
        print(f"{'mesh':22} {'temporaries':>22} {'arguments':>10}")
        meshes = {
            f"data {n}": S.MeshConfig(data=n),
            f"fsdp {n}": S.MeshConfig(data=1, fsdp=n),
            f"data {n // 4} x fsdp 2 x tensor 2": S.MeshConfig(data=n // 4, fsdp=2, tensor=2),
        }
        for name, mesh_config in meshes.items():
            free, pinned = (sharded_memory(mesh_config, args.batch[0], args.dtype, p) for p in (False, True))
            print(
                f"{name:22} {pinned['temp_bytes'] / 2**30:7.2f} vs {free['temp_bytes'] / 2**30:5.2f}GiB "
                f"({pinned['temp_bytes'] / free['temp_bytes']:.3f}) {pinned['argument_bytes'] / 2**30:8.2f}GiB",
                flush=True,
            )
    if jax.default_backend() == "cpu":
        print("no accelerator: tokens/s and MFU are measured only on a GPU or TPU")
        return
    peak = PEAK_FLOPS.get(device.device_kind)
    print(f"{'remat':6} {'batch':>5} {'telemetry':>9} {'step':>10} {'tokens/s':>10}  MFU")
    for batch in args.batch:
        for remat in ("none", "dots", "full"):
            for telemetry in (False, True) if args.telemetry else (False,):
                r = throughput(remat, batch, args.dtype, args.steps, telemetry)
                mfu = f"{r['flops'] / peak:.1%}" if peak else f"(no peak known for {device.device_kind!r})"
                print(
                    f"{remat:6} {batch:5} {telemetry!s:>9} {r['step_ms']:7.1f} ms {r['tokens_per_s']:10.0f}  {mfu}",
                    flush=True,
                )


if __name__ == "__main__":
    main()
