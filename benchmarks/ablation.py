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

Patching (`--patching`), at those shapes and at 2 layers x d_model 768 x vocab 50257 x seq 256
("gpt2vocab", batch 1):
  grid:  `patch_resid(model, clean, corrupted, answer, wrong)`: every (layer, position), one call
  loop:  what a TransformerLens user runs, one full patched forward pass per (layer, position)
         (`run_with_hooks` with a hook on `resid_pre`), here one compiled function with the layer
         and position as traced arguments, logits at every position. Every cell costs the same, so
         the loop is timed on `--loop-cells` random cells and scaled to the L x P grid.
With `--positions K` both patch only K evenly spaced positions (L x K cells; the grid still pays
its two unpatched runs whole, so its ratio can only be worse than the full grid's): the full grid
at the big shape (3,072 cells) takes tens of minutes on a 2-core CPU.
and prints grid / loop (target: at most 0.6 at every shape).

With `--depths 4,48`: at the small shape's width and each depth, the sweep's compile time (its first
call less a later one; target: 48 layers at most 2x 4 layers) and sweep / loop.

    python benchmarks/ablation.py [--reps 5] [--shapes small,big] [--json out.json]
    python benchmarks/ablation.py --depths 4,48 [--reps 2]
    python benchmarks/ablation.py --patching [--shapes small,big,gpt2vocab] [--reps 3] [--loop-cells 16]
        [--positions K]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from forward import SHAPES, config, time_interleaved

from resstream import ModelConfig, Transformer, interventions
from resstream import ablation as A  # noqa: N812
from resstream.patching import patch_resid
from resstream.stream import ResidualStream

PATCHING_SHAPES = {
    **SHAPES,
    "gpt2vocab": dict(n_layers=2, d_model=768, n_heads=12, batch=1, seq=256, vocab_size=50257),
}


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


def _patched_forward(model: Transformer):
    """A full forward pass of `corrupted` with the clean stream entering `layer` copied in at
    `position` (both traced: one compile for the whole loop), and the logit difference it gives."""
    graphdef, state = nnx.split(model)

    @jax.jit
    def run(state, corrupted, clean_resid_pre, layer, position, answer, wrong):
        model = nnx.merge(graphdef, state)
        cfg = model.cfg
        resid, rope = model.embed(corrupted).read(), model.rope(corrupted.shape[1])
        at = jnp.arange(corrupted.shape[1])[None, :, None] == position
        for index in range(cfg.n_layers):
            resid = jnp.where(at & (index == layer), clean_resid_pre[index], resid)
            stream = ResidualStream(resid, {}, residual=cfg.residual, carry_scale=cfg.residual_scale)
            resid = model.layer(index)(stream, rope).read()
        logits = model.unembed(resid)[0]  # every position, as a hooked forward pass gives
        rows = jnp.arange(logits.shape[0])
        return jnp.mean(logits[rows, -1, answer] - logits[rows, -1, wrong])

    return lambda *args: run(state, *args)


def measure_patching(name: str, reps: int, loop_cells: int, n_positions: int | None = None) -> dict:
    shape = PATCHING_SHAPES[name]
    cfg = ModelConfig(
        vocab_size=shape.get("vocab_size", 256), n_layers=shape["n_layers"], d_model=shape["d_model"],
        n_heads=shape["n_heads"], n_ctx=shape["seq"],
    )  # fmt: skip
    model = Transformer(cfg, rngs=nnx.Rngs(0))
    batch, seq = shape["batch"], shape["seq"]
    clean = jax.random.randint(jax.random.key(1), (batch, seq), 0, cfg.vocab_size)
    corrupted = jax.random.randint(jax.random.key(2), (batch, seq), 0, cfg.vocab_size)
    answer, wrong = clean[:, -1], corrupted[:, -1]
    columns = np.linspace(0, seq - 1, n_positions or seq).round().astype(int)

    def grid() -> None:
        jax.block_until_ready(patch_resid(model, clean, corrupted, answer, wrong, positions=columns).logit_diff)

    clean_resid_pre = model.run_with_cache(clean, record=("resid_pre",))[1]["resid_pre"]
    forward = _patched_forward(model)
    rng = np.random.default_rng(0)

    def loop_sample() -> None:
        for _ in range(loop_cells):
            layer, position = int(rng.integers(cfg.n_layers)), int(rng.choice(columns))
            jax.block_until_ready(forward(corrupted, clean_resid_pre, layer, position, answer, wrong))

    start = time.perf_counter()
    grid()
    first_grid = time.perf_counter() - start
    loop_sample()  # compile
    grid_times, cell_times = [], []
    for _ in range(reps):  # interleaved, so that the machine's drift hits both alike
        for fn, times, per in ((grid, grid_times, 1), (loop_sample, cell_times, loop_cells)):
            start = time.perf_counter()
            fn()
            times.append((time.perf_counter() - start) / per)
    n_cells = cfg.n_layers * len(columns)
    grid_s, loop_s = statistics.median(grid_times), statistics.median(cell_times) * n_cells
    return {"shape": name, "cells": n_cells, "grid_s": grid_s, "loop_s": loop_s, "ratio": grid_s / loop_s,
            "first_call_grid_s": first_grid}  # fmt: skip


def main_patching(args: argparse.Namespace) -> list[dict]:
    results = []
    for name in args.shapes.split(","):
        r = measure_patching(name, args.reps, args.loop_cells, args.positions)
        results.append(r)
        s = PATCHING_SHAPES[name]
        print(
            f"{name:>9} ({s['n_layers']} layers x d {s['d_model']}, vocab {s.get('vocab_size', 256)}, "
            f"{s['batch']} x {s['seq']}; {r['cells']} cells): grid {r['grid_s']:.2f} s   loop {r['loop_s']:.2f} s   "
            f"grid/loop {r['ratio']:.3f} (target <= 0.6)   first grid call {r['first_call_grid_s']:.1f} s",
            flush=True,
        )
    return results


def measure_depths(depths: list[int], reps: int) -> list[dict]:
    """At the small shape's width, for each depth: the sweep's compile (its first call less a
    later one), and sweep / loop as in `measure`."""
    results = []
    for n_layers in depths:
        shape = {**SHAPES["small"], "n_layers": n_layers}
        model = Transformer(config(shape), rngs=nnx.Rngs(0))
        tokens = jax.random.randint(jax.random.key(1), (shape["batch"], shape["seq"]), 0, model.cfg.vocab_size)
        labels = interventions.component_labels(model.cfg, "sublayers")

        def sweep(model=model, tokens=tokens):
            return A.ablation_sweep(model, tokens, "sublayers", direct=False).total

        def loop(model=model, tokens=tokens, labels=labels):
            baseline = A.ablate(model, tokens, []).loss
            return [A.ablate(model, tokens, [label]).loss - baseline for label in labels]

        start = time.perf_counter()
        jax.block_until_ready(sweep())
        first = time.perf_counter() - start
        times = time_interleaved({"sweep": sweep, "loop": loop}, reps)
        results.append({"n_layers": n_layers, "compile_s": first - times["sweep"], **times})
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--shapes", default="small,big")
    parser.add_argument("--json", default=None)
    parser.add_argument("--patching", action="store_true", help="the patching grid against a loop instead")
    parser.add_argument("--loop-cells", type=int, default=16)
    parser.add_argument("--positions", type=int, default=None, help="patch only this many positions")
    parser.add_argument("--depths", default=None, help="e.g. 4,48: the sweep's compile and ratio by depth instead")
    args = parser.parse_args()
    print(f"jax {jax.__version__} on {jax.devices()[0].device_kind}")
    if args.depths:
        rows = measure_depths([int(d) for d in args.depths.split(",")], args.reps)
        for r in rows:
            print(
                f"{r['n_layers']:4d} layers: sweep compile {r['compile_s']:6.2f} s "
                f"({r['compile_s'] / rows[0]['compile_s']:.2f}x the first, target <= 2)"
                f"   sweep {r['sweep'] * 1e3:8.1f} ms   loop {r['loop'] * 1e3:8.1f} ms"
                f"   sweep/loop {r['sweep'] / r['loop']:.3f} (target <= 0.6)"
            )
        return
    results = main_patching(args) if args.patching else []
    for name in [] if args.patching else args.shapes.split(","):
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
