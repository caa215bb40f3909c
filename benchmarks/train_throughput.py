"""Train-step throughput: tokens/s with telemetry off and on, and the achieved FLOP/s as a fraction
of this machine's float32 matmul peak, measured in the same run; then, for a training loop of
`--steps` steps, the time when the host reads the step's "finite" flag after every step (waiting
on the device each time, as the loop did before issue 11) against reading it only at the end.

    python benchmarks/train_throughput.py [--steps 20] [--shapes small,default,big]

Model FLOPs per token: 6 x (non-embedding parameters + unembedding) for the matmuls, forward and
backward, plus 12 x n_layers x seq x d_model for the attention scores and their weighted sum
(PaLM's accounting; causal masking not discounted).
"""

from __future__ import annotations

import argparse
import statistics
import time
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from resstream import ModelConfig, Transformer
from resstream.train import OptimizerConfig, init_state, make_optimizer, train_step

SHAPES = {
    "small": dict(n_layers=4, n_heads=4, d_model=128, seq=64, batch=12),
    "default": dict(n_layers=4, n_heads=4, d_model=128, seq=128, batch=16),  # configs/default.py
    "big": dict(n_layers=12, n_heads=8, d_model=256, seq=256, batch=8),
}


def matmul_peak(n: int = 2048, reps: int = 10) -> float:
    """Measured float32 FLOP/s of one large jnp.dot (the best of `reps`)."""
    a = jax.random.normal(jax.random.key(0), (n, n), jnp.float32)
    b = jax.random.normal(jax.random.key(1), (n, n), jnp.float32)
    dot = jax.jit(jnp.dot)
    dot(a, b).block_until_ready()
    best = min(_timed(lambda: dot(a, b)) for _ in range(reps))
    return 2 * n**3 / best


def _timed(fn) -> float:
    start = time.perf_counter()
    jax.block_until_ready(fn())
    return time.perf_counter() - start


def flops_per_token(cfg: ModelConfig, seq: int) -> float:
    per_layer = 4 * cfg.d_model * cfg.n_heads * cfg.d_head + (0 if cfg.attn_only else 2 * cfg.d_model * cfg.d_mlp)
    matmul_params = cfg.n_layers * per_layer + cfg.d_model * cfg.vocab_size
    return 6 * matmul_params + 12 * cfg.n_layers * seq * cfg.d_model


def model_config(shape: dict) -> ModelConfig:
    return ModelConfig(
        vocab_size=256,
        n_layers=shape["n_layers"],
        n_heads=shape["n_heads"],
        d_model=shape["d_model"],
        n_ctx=shape["seq"],
    )


def bench(shape: dict, steps: int) -> dict:
    cfg = model_config(shape)
    optimizer = make_optimizer(OptimizerConfig(total_steps=10_000))
    graphdef, state_on = init_state(Transformer(cfg, rngs=nnx.Rngs(0)), optimizer, 0)
    _, state_off = init_state(Transformer(cfg, rngs=nnx.Rngs(0)), optimizer, 0)
    batch = jax.random.randint(jax.random.key(0), (1, shape["batch"], shape["seq"] + 1), 0, 256)
    states = {True: state_on, False: state_off}
    times: dict[bool, list[float]] = {True: [], False: []}
    for i in range(steps + 2):  # interleaved, the first two steps (compilation) not counted
        for telemetry in (False, True):
            start = time.perf_counter()
            states[telemetry], metrics = train_step(
                states[telemetry], batch, graphdef=graphdef, optimizer=optimizer, telemetry=telemetry
            )
            jax.block_until_ready(metrics["loss"])
            if i >= 2:
                times[telemetry].append(time.perf_counter() - start)
    tokens = shape["batch"] * shape["seq"]
    off, on = statistics.median(times[False]), statistics.median(times[True])
    return {
        "tokens_per_s_off": tokens / off,
        "tokens_per_s_on": tokens / on,
        "step_ms_off": 1e3 * off,
        "step_ms_on": 1e3 * on,
        "flops_per_s": flops_per_token(cfg, shape["seq"]) * tokens / off,
    }


def loop_sync(shape: dict, steps: int, reps: int = 3) -> dict:
    """Seconds for `steps` train steps (telemetry on, as the loop runs them) with the host reading
    metrics["finite"] after each one, and with the flag threaded on the device and read once at the
    end; interleaved, best of `reps`."""
    cfg = ModelConfig(
        vocab_size=256,
        n_layers=shape["n_layers"],
        n_heads=shape["n_heads"],
        d_model=shape["d_model"],
        n_ctx=shape["seq"],
    )
    optimizer = make_optimizer(OptimizerConfig(total_steps=10_000))
    graphdef, state = init_state(Transformer(cfg, rngs=nnx.Rngs(0)), optimizer, 0)
    batches = [jax.random.randint(jax.random.key(i), (1, shape["batch"], shape["seq"] + 1), 0, 256) for i in range(4)]
    state, metrics = train_step(state, batches[0], graphdef=graphdef, optimizer=optimizer)  # compile
    jax.block_until_ready(metrics["loss"])

    def run(sync_every_step: bool) -> float:
        nonlocal state
        finite: Any = True
        start = time.perf_counter()
        for i in range(steps):
            state, metrics = train_step(state, batches[i % 4], finite, graphdef=graphdef, optimizer=optimizer)
            finite = metrics["finite"]
            if sync_every_step:
                assert bool(finite)
        assert bool(finite)
        return time.perf_counter() - start

    times = {True: [], False: []}
    for _ in range(reps):
        for sync in (True, False):
            times[sync].append(run(sync))
    return {"synced": min(times[True]), "unsynced": min(times[False])}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--shapes", default="small,default,big")
    args = parser.parse_args()
    print(f"jax {jax.__version__} on {jax.devices()[0].device_kind}")
    peak = matmul_peak()
    print(f"measured float32 matmul peak (2048^3 jnp.dot): {peak / 1e9:.0f} GFLOP/s")
    print(
        f"{'shape':6} {'step off':>9} {'step on':>9} {'tok/s off':>10} {'tok/s on':>9} {'on/off time':>11} "
        f"{'GFLOP/s':>8} {'of peak':>7}"
    )
    for name in args.shapes.split(","):
        r = bench(SHAPES[name], args.steps)
        print(
            f"{name:6} {r['step_ms_off']:7.1f}ms {r['step_ms_on']:7.1f}ms {r['tokens_per_s_off']:10.0f} "
            f"{r['tokens_per_s_on']:9.0f} {r['step_ms_on'] / r['step_ms_off']:11.3f} {r['flops_per_s'] / 1e9:8.1f} "
            f"{r['flops_per_s'] / peak:7.1%}"
        )
    print("targets (issue 3): small >= 25,000 tok/s (PyTorch eager here); big >= 50% of peak; telemetry <= 5%")
    print(f"\n{args.steps} steps of a loop: host reads the finite flag every step vs once (best of 3, interleaved)")
    print(f"{'shape':8} {'every step':>10} {'once':>8} {'every / once':>12}")
    for name in args.shapes.split(","):
        r = loop_sync(SHAPES[name], args.steps)
        print(f"{name:8} {r['synced']:9.3f}s {r['unsynced']:7.3f}s {r['synced'] / r['unsynced']:12.3f}")


if __name__ == "__main__":
    main()
