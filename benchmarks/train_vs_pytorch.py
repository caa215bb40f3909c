"""resstream's train step against nanoGPT's in PyTorch eager, side by side on this machine.

    python benchmarks/train_vs_pytorch.py [--steps 12] [--rounds 3] [--shapes small,default,big]

Each (framework, shape) runs in its own process (two frameworks' thread pools in one process slow
each other), alternating resstream and PyTorch for `--rounds` rounds; a process times `--steps`
steps after two warm-up steps (resstream's compile), reading the loss on the host after each step as
a training loop does. Printed: the median step time of each, their ratio, and the page faults per
step. resstream runs its defaults (remat "dots", float32) with telemetry off, in a process set up
as its training loop sets it up (`resstream.host_memory.reuse_step_buffers`: freed memory kept,
programs run synchronously); `--jax-defaults` adds a column with JAX and glibc left as they are.
PyTorch is the nanoGPT architecture in benchmarks/nanogpt_torch.py. Without torch installed the
PyTorch column is skipped.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import resource
import statistics
import sys
import time
from pathlib import Path

from processes import run_json

SHAPES = {
    "small": dict(n_layers=4, n_heads=4, d_model=128, seq=64, batch=12),  # nanoGPT's CPU example
    "default": dict(n_layers=4, n_heads=4, d_model=128, seq=128, batch=16),  # configs/default.py
    "big": dict(n_layers=12, n_heads=8, d_model=256, seq=256, batch=8),
}
VOCAB = 256


def faults() -> int:
    """Page faults (minor: a page mapped and zeroed) of this process so far."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def time_resstream(shape: dict, steps: int, as_trained: bool = True) -> dict:
    import jax
    from flax import nnx

    from resstream import ModelConfig, Transformer
    from resstream.config import OptimizerConfig
    from resstream.host_memory import reuse_step_buffers
    from resstream.train import init_state, make_optimizer, train_step

    if as_trained:  # as resstream's training loop does, before any computation
        reuse_step_buffers()

    cfg = ModelConfig(
        vocab_size=VOCAB, n_layers=shape["n_layers"], n_heads=shape["n_heads"], d_model=shape["d_model"],
        n_ctx=shape["seq"], unembed_bias=False,
    )  # fmt: skip
    optimizer = make_optimizer(OptimizerConfig(total_steps=10_000))
    graphdef, state = init_state(Transformer(cfg, rngs=nnx.Rngs(0)), optimizer, 0)
    batches = [jax.random.randint(jax.random.key(i), (1, shape["batch"], shape["seq"] + 1), 0, VOCAB) for i in range(4)]
    times = []
    start = time.perf_counter()
    state, metrics = train_step(state, batches[0], graphdef=graphdef, optimizer=optimizer, telemetry=False)
    float(metrics["loss"])
    first = time.perf_counter() - start
    for i in range(steps + 1):
        if i == 1:  # the second step too may still be settling
            faults_before = faults()
        start = time.perf_counter()
        state, metrics = train_step(state, batches[i % 4], graphdef=graphdef, optimizer=optimizer, telemetry=False)
        float(metrics["loss"])
        if i:
            times.append(time.perf_counter() - start)
    return {"step_s": statistics.median(times), "first_step_s": first, "faults": (faults() - faults_before) / steps}


def time_pytorch(shape: dict, steps: int) -> dict:
    import torch

    sys.path.insert(0, str(Path(__file__).parent))
    from nanogpt_torch import GPT, make_train_step

    torch.manual_seed(0)
    model = GPT(VOCAB, shape["seq"], shape["n_layers"], shape["d_model"], shape["n_heads"])
    step = make_train_step(model)
    data = torch.randint(0, VOCAB, (4, shape["batch"], shape["seq"] + 1))
    times = []
    for i in range(steps + 2):
        if i == 2:
            faults_before = faults()
        start = time.perf_counter()
        step(data[i % 4, :, :-1], data[i % 4, :, 1:])
        if i >= 2:
            times.append(time.perf_counter() - start)
    return {"step_s": statistics.median(times), "faults": (faults() - faults_before) / steps}


WORKERS = {
    "resstream": time_resstream,
    "resstream, JAX defaults": lambda shape, steps: time_resstream(shape, steps, as_trained=False),
    "nanoGPT": lambda shape, steps: time_pytorch(shape, steps),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--shapes", default="small,default,big")
    parser.add_argument("--jax-defaults", action="store_true")
    parser.add_argument("--worker", choices=sorted(WORKERS), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(WORKERS[args.worker](SHAPES[args.shapes], args.steps)))
        return

    have_torch = importlib.util.find_spec("torch") is not None
    frameworks = ["resstream"] + ["resstream, JAX defaults"] * args.jax_defaults
    frameworks += ["nanoGPT"] * have_torch
    if not have_torch:
        print("torch is not installed: the PyTorch column is skipped (pip install torch==2.13.0 for a CPU build)")
    results: dict[tuple[str, str], list[dict]] = {}
    for _ in range(args.rounds):
        for shape in args.shapes.split(","):
            for framework in frameworks:
                results.setdefault((framework, shape), []).append(
                    run_json(__file__, "--worker", framework, "--shapes", shape, "--steps", str(args.steps))
                )
    print(f"median step time over {args.rounds} rounds x {args.steps} steps, one process each, interleaved")
    for shape in args.shapes.split(","):
        s = SHAPES[shape]
        print(f"{shape}: {s['n_layers']} layers x d {s['d_model']}, batch {s['batch']} x seq {s['seq']}")
        ours = statistics.median(r["step_s"] for r in results[("resstream", shape)])
        for framework in frameworks:
            runs = results[(framework, shape)]
            step = statistics.median(r["step_s"] for r in runs)
            faults_per_step = statistics.median(r["faults"] for r in runs)
            ratio = f"resstream / this {ours / step:5.2f}" if framework != "resstream" else ""
            first = statistics.median(r["first_step_s"] for r in runs) if "first_step_s" in runs[0] else None
            first = f"first step {first:5.2f}s" if first else ""
            print(f"  {framework:31} {1e3 * step:8.1f} ms {faults_per_step:8.0f} faults/step  {ratio:22} {first}")
    print("resstream / nanoGPT: the target is at most 1.0; first step: resstream's compile + one step")


if __name__ == "__main__":
    main()
