"""Forward-pass benchmark: the cost of recording, of the decomposition, and of depth at compile time.

Prints, measured side by side in one run on the same inputs, at two shapes:
  (a) run_with_cache time / plain forward time        (target: at most 1.15)
  (b) decompose_logits + logit_attrs time              (jitted, on a cache already made)
  (c) compile time of a 1000-layer model / a 4-layer model of the same width  (target: at most 2)
  (d) with --deepnorm, (c) again for DeepNorm models (post-LN, the stream carried as alpha * x)

    python benchmarks/forward.py [--reps 20] [--shapes small,big] [--deepnorm] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp
from flax import nnx

from resstream import ModelConfig, Transformer
from resstream import analysis as A  # noqa: N812

SHAPES = {
    "small": dict(n_layers=4, d_model=128, n_heads=4, batch=12, seq=64),
    "big": dict(n_layers=12, d_model=256, n_heads=8, batch=8, seq=256),
}


def config(shape: dict, n_layers: int | None = None, deepnorm: bool = False) -> ModelConfig:
    return ModelConfig(
        vocab_size=256,
        n_layers=n_layers or shape["n_layers"],
        d_model=shape["d_model"],
        n_heads=shape["n_heads"],
        n_ctx=shape["seq"],
        **(dict(norm_placement="post", deepnorm=True) if deepnorm else {}),
    )


def time_interleaved(fns: dict[str, Callable[[], object]], reps: int) -> dict[str, float]:
    """Median seconds per call of each function, calls interleaved so that drift hits all alike."""
    for fn in fns.values():  # compile and warm up
        jax.block_until_ready(fn())
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(reps):
        for name, fn in fns.items():
            start = time.perf_counter()
            jax.block_until_ready(fn())
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(ts) for name, ts in times.items()}


def compile_seconds(cfg: ModelConfig, batch: int, seq: int, reps: int = 3) -> float:
    """Median time to lower and compile the forward pass, from abstract parameters (nothing is
    allocated, so a 1000-layer model costs no memory)."""
    graphdef, state = nnx.split(nnx.eval_shape(lambda: Transformer(cfg, rngs=nnx.Rngs(0))))
    tokens = jax.ShapeDtypeStruct((batch, seq), jnp.int32)
    seconds = []
    for _ in range(reps):
        jax.clear_caches()
        forward = jax.jit(lambda s, t: nnx.merge(graphdef, s)(t))
        start = time.perf_counter()
        forward.lower(state, tokens).compile()
        seconds.append(time.perf_counter() - start)
    return statistics.median(seconds)


def bench_shape(name: str, shape: dict, reps: int, deepnorm: bool = False) -> dict:
    cfg = config(shape)
    model = Transformer(cfg, rngs=nnx.Rngs(0))
    graphdef, state = nnx.split(model)
    tokens = jax.random.randint(jax.random.key(0), (shape["batch"], shape["seq"]), 0, cfg.vocab_size)
    targets = jnp.roll(tokens, -1, axis=1)

    forward = jax.jit(lambda s, t: nnx.merge(graphdef, s)(t))
    with_cache = jax.jit(lambda s, t: nnx.merge(graphdef, s).run_with_cache(t))

    # Two separate calls, as a user makes them: neither shares work with the other.
    decompose_logits = jax.jit(lambda s, cache: A.decompose_logits(nnx.merge(graphdef, s), cache).values)
    logit_attrs = jax.jit(lambda s, cache, targets: A.logit_attrs(nnx.merge(graphdef, s), cache, targets).values)

    _, cache = with_cache(state, tokens)
    timings = time_interleaved(
        {
            "forward": lambda: forward(state, tokens),
            "run_with_cache": lambda: with_cache(state, tokens),
            "decompose_logits": lambda: decompose_logits(state, cache),
            "logit_attrs": lambda: logit_attrs(state, cache, targets),
            # the public API called directly, as from a notebook (it compiles internally)
            "api_decompose_and_attrs": lambda: (
                A.decompose_logits(model, cache).values,
                A.logit_attrs(model, cache, targets).values,
            ),
        },
        reps,
    )
    compile_4 = compile_seconds(config(shape, 4), shape["batch"], shape["seq"])
    compile_1000 = compile_seconds(config(shape, 1000), shape["batch"], shape["seq"])
    deep = {}
    if deepnorm:
        deep_4, deep_1000 = (
            compile_seconds(config(shape, n, deepnorm=True), shape["batch"], shape["seq"]) for n in (4, 1000)
        )
        deep = {
            "deepnorm_compile_4_layers_s": deep_4,
            "deepnorm_compile_1000_layers_s": deep_1000,
            "deepnorm_compile_1000_over_4": deep_1000 / deep_4,
        }
    return {
        "shape": name,
        **shape,
        "forward_ms": 1e3 * timings["forward"],
        "run_with_cache_ms": 1e3 * timings["run_with_cache"],
        "cache_over_forward": timings["run_with_cache"] / timings["forward"],
        "decompose_logits_ms": 1e3 * timings["decompose_logits"],
        "logit_attrs_ms": 1e3 * timings["logit_attrs"],
        "decompose_and_attrs_ms": 1e3 * (timings["decompose_logits"] + timings["logit_attrs"]),
        "api_decompose_and_attrs_ms": 1e3 * timings["api_decompose_and_attrs"],
        "compile_4_layers_s": compile_4,
        "compile_1000_layers_s": compile_1000,
        "compile_1000_over_4": compile_1000 / compile_4,
        **deep,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--reps", type=int, default=20)
    parser.add_argument("--shapes", default="small,big")
    parser.add_argument("--deepnorm", action="store_true", help="also time compiling DeepNorm models (4, 1000 layers)")
    parser.add_argument("--json", help="also write the results to this file")
    args = parser.parse_args()

    print(f"jax {jax.__version__} on {jax.devices()[0].device_kind} ({jax.device_count()} device(s))")
    results = [bench_shape(name, SHAPES[name], args.reps, args.deepnorm) for name in args.shapes.split(",")]
    header = (
        f"{'shape':6} {'layers x d x heads, batch x seq':32} {'forward':>9} {'w/ cache':>9} {'ratio':>6} "
        f"{'decompose':>9} {'attrs':>7} {'both':>8} {'compile 4L':>10} {'1000L':>7} {'ratio':>6}"
    )
    print(header)
    for r in results:
        dims = f"{r['n_layers']} x {r['d_model']} x {r['n_heads']}, {r['batch']} x {r['seq']}"
        print(
            f"{r['shape']:6} {dims:32} {r['forward_ms']:7.2f}ms {r['run_with_cache_ms']:7.2f}ms "
            f"{r['cache_over_forward']:6.3f} {r['decompose_logits_ms']:7.2f}ms {r['logit_attrs_ms']:5.2f}ms "
            f"{r['decompose_and_attrs_ms']:6.2f}ms "
            f"{r['compile_4_layers_s']:9.2f}s {r['compile_1000_layers_s']:6.2f}s {r['compile_1000_over_4']:6.2f}"
        )
    print("decompose = decompose_logits, attrs = logit_attrs (to the next token), both jitted, on a ready cache")
    for r in results:
        print(
            f"{r['shape']}: decompose_logits + logit_attrs called directly (not under a jit of ours): "
            f"{r['api_decompose_and_attrs_ms']:.2f}ms"
        )
    for r in results:
        if "deepnorm_compile_1000_over_4" in r:
            print(
                f"{r['shape']}: compile, DeepNorm (post-LN, norm(alpha * x + f(x))): 4 layers "
                f"{r['deepnorm_compile_4_layers_s']:.2f}s, 1000 layers {r['deepnorm_compile_1000_layers_s']:.2f}s, "
                f"ratio {r['deepnorm_compile_1000_over_4']:.2f}"
            )
    print("targets: run_with_cache / forward <= 1.15; compile 1000 layers / 4 layers <= 2 (DeepNorm too)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
