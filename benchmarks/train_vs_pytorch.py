"""resstream's train step against nanoGPT's in PyTorch eager, side by side on this machine.

    python benchmarks/train_vs_pytorch.py [--steps 12] [--rounds 3] [--shapes small,default,big]

Each (framework, shape) runs in its own process (two frameworks' thread pools in one process slow
each other), alternating resstream and PyTorch for `--rounds` rounds; a process times `--steps`
steps after two warm-up steps (resstream's compile), reading the loss on the host after each step as
a training loop does. Printed: the median step time of each and their ratio. resstream runs its
defaults (remat "dots", float32) with telemetry off; PyTorch is the nanoGPT architecture in
benchmarks/nanogpt_torch.py. Without torch installed the PyTorch column is skipped.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
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


def time_resstream(shape: dict, steps: int) -> dict:
    import jax
    from flax import nnx

    from resstream import ModelConfig, Transformer
    from resstream.config import OptimizerConfig
    from resstream.train import init_state, make_optimizer, train_step

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
        start = time.perf_counter()
        state, metrics = train_step(state, batches[i % 4], graphdef=graphdef, optimizer=optimizer, telemetry=False)
        float(metrics["loss"])
        if i:  # the second step too may still be settling
            times.append(time.perf_counter() - start)
    return {"step_s": statistics.median(times), "first_step_s": first}


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
        start = time.perf_counter()
        step(data[i % 4, :, :-1], data[i % 4, :, 1:])
        if i >= 2:
            times.append(time.perf_counter() - start)
    return {"step_s": statistics.median(times), "threads": torch.get_num_threads()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--shapes", default="small,default,big")
    parser.add_argument("--worker", choices=("resstream", "pytorch"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        timer = time_resstream if args.worker == "resstream" else time_pytorch
        print(json.dumps(timer(SHAPES[args.shapes], args.steps)))
        return

    have_torch = importlib.util.find_spec("torch") is not None
    frameworks = ["resstream"] + (["pytorch"] if have_torch else [])
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
    header = f"{'shape':8} {'layers x d, batch x seq':>24} {'nanoGPT':>9} {'resstream':>10} {'ratio':>6}"
    print(f"{header} {'first step':>10}")
    for shape in args.shapes.split(","):
        s = SHAPES[shape]
        desc = f"{s['n_layers']} x {s['d_model']}, {s['batch']} x {s['seq']}"
        ours = statistics.median(r["step_s"] for r in results[("resstream", shape)])
        first = statistics.median(r["first_step_s"] for r in results[("resstream", shape)])
        if have_torch:
            theirs = statistics.median(r["step_s"] for r in results[("pytorch", shape)])
            torch_cell, ratio = f"{1e3 * theirs:7.1f}ms", f"{ours / theirs:6.2f}"
        else:
            torch_cell, ratio = f"{'-':>9}", f"{'-':>6}"
        print(f"{shape:8} {desc:>24} {torch_cell} {1e3 * ours:8.1f}ms {ratio} {first:9.2f}s")
    print("ratio: resstream / nanoGPT step time (target: at most 1.0); first step: resstream's compile + one step")


if __name__ == "__main__":
    main()
