"""Ablation-sweep benchmark: every attention and MLP write zero-ablated, as one sweep versus a loop.

At the two shapes of the forward benchmark, measured side by side in one run on the same inputs:
  sweep:        `ablation_sweep(model, tokens, "sublayers", direct=False)`: the table of loss
                deltas, in one compiled call that shares each ablation's unablated prefix
  sweep+direct: the same with the direct effect of every component (the default)
  loop:         the same table as a Python loop of single forward passes (`ablate`, compiled once):
                the unablated baseline, then one ablated forward per component
and prints sweep / loop (target: at most 0.6) with the times, plus the first call (compile) of each.
Work, in sublayers, for S sublayers: the loop does S * (S + 1); the sweep S for the baseline plus
S - 1 - k for the ablation of sublayer k (its prefix is shared and its own write is known), so
S * (S + 1) / 2: half, plus one unembedding per component either way.

    python benchmarks/ablation.py [--reps 5] [--shapes small,big] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import time

import jax
from flax import nnx
from forward import SHAPES, config, time_interleaved

from resstream import Transformer, interventions
from resstream import ablation as A  # noqa: N812


def measure(name: str, reps: int) -> dict:
    shape = SHAPES[name]
    cfg = config(shape)
    model = Transformer(cfg, rngs=nnx.Rngs(0))
    tokens = jax.random.randint(jax.random.key(1), (shape["batch"], shape["seq"]), 0, cfg.vocab_size)
    labels = interventions.component_labels(cfg, "sublayers")

    def sweep():
        return A.ablation_sweep(model, tokens, "sublayers", direct=False).total

    def sweep_direct():
        table = A.ablation_sweep(model, tokens, "sublayers")
        return table.total, table.direct

    def loop():
        baseline = A.ablate(model, tokens, []).loss
        return [A.ablate(model, tokens, [label]).loss - baseline for label in labels]

    fns = {"sweep": sweep, "sweep_direct": sweep_direct, "loop": loop}
    first_call = {}
    for fn_name, fn in fns.items():
        start = time.perf_counter()
        jax.block_until_ready(fn())
        first_call[fn_name] = time.perf_counter() - start
    times = time_interleaved(fns, reps)
    return {
        "shape": name,
        "n_ablations": len(labels),
        **{f"{k}_s": v for k, v in times.items()},
        "ratio": times["sweep"] / times["loop"],
        "ratio_direct": times["sweep_direct"] / times["loop"],
        **{f"first_call_{k}_s": v for k, v in first_call.items()},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--shapes", default="small,big")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    print(f"jax {jax.__version__} on {jax.devices()[0].device_kind}")
    results = []
    for name in args.shapes.split(","):
        r = measure(name, args.reps)
        results.append(r)
        print(
            f"{name:>5} ({r['n_ablations']} ablations): sweep {r['sweep_s'] * 1e3:8.1f} ms   "
            f"sweep+direct {r['sweep_direct_s'] * 1e3:8.1f} ms   loop {r['loop_s'] * 1e3:8.1f} ms\n"
            f"      sweep/loop {r['ratio']:.3f} (target <= 0.6)   sweep+direct/loop {r['ratio_direct']:.3f}   "
            f"first call: sweep {r['first_call_sweep_s']:.1f} s, sweep+direct "
            f"{r['first_call_sweep_direct_s']:.1f} s, loop {r['first_call_loop_s']:.1f} s"
        )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
