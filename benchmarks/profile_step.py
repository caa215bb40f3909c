"""Profile the train step: where its time goes, and how its compile time grows with depth.

    python benchmarks/profile_step.py [--shape default] [--steps 3] [--out /tmp/resstream_profile]
    python benchmarks/profile_step.py --compile [--depths 4,1000]

The first form runs a few train steps (telemetry off, the run's defaults) under `jax.profiler` and
writes the trace to `--out` (open it with TensorBoard's or xprof's profile plugin, or Perfetto).
If `xprof` is installed (`pip install xprof`; not a dependency) it also prints the HLO ops that took
the most time per step, each with its output shape and the source operation it came from: the table
that showed attention's [seq, seq] passes to be the CPU step's largest cost (resstream/attention.py).

`--compile` lowers and compiles the train step from abstract parameters (nothing allocated) at each
of `--depths` layers and prints the seconds and the ratio to the first: the layers are one scanned
body, so a 1000-layer model should compile in at most twice the time of a 4-layer one.
"""

from __future__ import annotations

import argparse
import collections
import glob
import importlib.util
import json
import re
import statistics
import time

import jax
import jax.numpy as jnp
from flax import nnx
from train_vs_pytorch import SHAPES, VOCAB

from resstream import ModelConfig, Transformer
from resstream.config import OptimizerConfig
from resstream.host_memory import reuse_step_buffers
from resstream.train import init_state, make_optimizer, train_step


def setup(shape: dict, n_layers: int | None = None, abstract: bool = False):
    cfg = ModelConfig(
        vocab_size=VOCAB, n_layers=n_layers or shape["n_layers"], n_heads=shape["n_heads"],
        d_model=shape["d_model"], n_ctx=shape["seq"], unembed_bias=False,
    )  # fmt: skip
    optimizer = make_optimizer(OptimizerConfig(total_steps=10_000))

    batch_shape = (1, shape["batch"], shape["seq"] + 1)
    if not abstract:
        graphdef, state = init_state(Transformer(cfg, rngs=nnx.Rngs(0)), optimizer, 0)
        return graphdef, state, jnp.zeros(batch_shape, jnp.int32), optimizer
    model = nnx.eval_shape(lambda: Transformer(cfg, rngs=nnx.Rngs(0)))  # shapes only: nothing allocated
    state = jax.eval_shape(lambda m: init_state(m, optimizer, 0)[1], model)
    graphdef = nnx.split(model, nnx.Param)[0]
    return graphdef, state, jax.ShapeDtypeStruct(batch_shape, jnp.int32), optimizer


def compile_seconds(shape: dict, n_layers: int, reps: int = 3) -> float:
    graphdef, state, batch, optimizer = setup(shape, n_layers, abstract=True)
    seconds = []
    for _ in range(reps):
        jax.clear_caches()
        start = time.perf_counter()
        train_step.lower(state, batch, graphdef=graphdef, optimizer=optimizer, telemetry=False).compile()
        seconds.append(time.perf_counter() - start)
    return statistics.median(seconds)


def top_ops(trace_dir: str, hlo_text: str, steps: int, n: int) -> list[tuple[float, int, str, str, str]]:
    """(ms per step, calls per step, op, output shape, source op) of the `n` costliest HLO ops."""
    from xprof.convert import raw_to_tool_data

    info = {}
    for line in hlo_text.splitlines():
        m = re.match(r"\s*(?:ROOT )?%?([\w.\-]+) = (\S+) ", line)
        if m:
            source = re.search(r'op_name="([^"]+)"', line)
            info[m.group(1)] = (m.group(2), "/".join(source.group(1).split("/")[-2:]) if source else "")
    paths = glob.glob(f"{trace_dir}/plugins/profile/*/*.xplane.pb")
    data, _ = raw_to_tool_data.xspace_to_tool_data(paths[-1:], "trace_viewer", {})
    total, calls = collections.Counter(), collections.Counter()
    for event in json.loads(data)["traceEvents"]:
        name = event.get("name", "")
        if event.get("ph") == "X" and name in info and not name.startswith(("while", "conditional", "call")):
            total[name] += event.get("dur", 0)  # a loop or call is the ops inside it: not counted again
            calls[name] += 1
    return [(us / 1e3 / steps, calls[op] // steps, op, *info[op]) for op, us in total.most_common(n)]


def profile(shape: dict, steps: int, out: str, n: int) -> None:
    graphdef, state, batch, optimizer = setup(shape)
    step = lambda s: train_step(s, batch, graphdef=graphdef, optimizer=optimizer, telemetry=False)  # noqa: E731
    hlo = train_step.lower(state, batch, graphdef=graphdef, optimizer=optimizer, telemetry=False).compile().as_text()
    for _ in range(2):
        state, metrics = step(state)
    float(metrics["loss"])
    start = time.perf_counter()
    jax.profiler.start_trace(out)
    for _ in range(steps):
        state, metrics = step(state)
        float(metrics["loss"])
    jax.profiler.stop_trace()
    print(f"{steps} steps in {time.perf_counter() - start:.2f} s (profiled); trace written to {out}")
    if importlib.util.find_spec("xprof") is None:
        print("pip install xprof to print the costliest ops here")
        return
    print(f"{'ms/step':>8} {'calls':>5}  {'op':28} {'output':32} source")
    for ms, count, op, output, source in top_ops(out, hlo, steps, n):
        print(f"{ms:8.1f} {count:5d}  {op:28} {output[:32]:32} {source}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", default="default", choices=sorted(SHAPES))
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--out", default="/tmp/resstream_profile")
    parser.add_argument("--top", type=int, default=25)
    parser.add_argument("--compile", action="store_true")
    parser.add_argument("--depths", default="4,1000")
    args = parser.parse_args()
    reuse_step_buffers()  # as the training loop runs: each step's buffers reused (resstream.host_memory)
    shape = SHAPES[args.shape]
    if not args.compile:
        profile(shape, args.steps, args.out, args.top)
        return
    depths = [int(d) for d in args.depths.split(",")]
    seconds = {depth: compile_seconds(shape, depth) for depth in depths}
    for depth, s in seconds.items():
        print(f"train step, {depth:5d} layers ({args.shape} width): compile {s:.2f} s, {s / seconds[depths[0]]:.2f}x")


if __name__ == "__main__":
    main()
