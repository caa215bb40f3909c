"""On a GPU or TPU: the train step's tokens/s and MFU at GPT-2-small size, nanoGPT compiled by
PyTorch beside it, and the analysis calls at that size, in one command that keeps to a time budget.

    python benchmarks/accelerator.py [--batch 16] [--steps 10] [--budget-s 420] [--only dots,nanogpt,...]
        [--smoke]

Made for the few minutes of accelerator time a session may get. Each measurement runs in a
process of its own, given only the time that is left. A measurement that fails (out of memory, say)
or runs out of time prints why, and the next one goes on. Results print as they come.

The order is the order of importance:
  1. resstream's train step on configs/gpt2_small.py's model:
     - 12 x 768, context 1024, vocab 32,768;
     - bf16 compute, float32 parameters and Adam state;
     - micro-batch --batch, telemetry off;
     - attention "auto" (cuDNN's fused kernel on an NVIDIA GPU) and remat "dots".
  2. nanoGPT (benchmarks/nanogpt_torch.py) at the same shape, as its train.py runs on a GPU:
     torch.compile, bf16 autocast, fused AdamW. Skipped without torch or CUDA.
  3. The analysis calls on [1, 1024] tokens:
     - `run_with_cache`;
     - `decompose_logits(split_heads, pos=-1)` + `logit_attrs(split_heads)` at every position;
     - `ablation_sweep("heads")`: 144 zero-ablations.
     Each is timed on its first call (compile) and then as the median of later calls.
     Then how far the decomposition at the last position is from the logits (largest difference
     over the largest logit), for the model and for a float32 copy: float32 matmuls must run in
     float32 (no TF32), which makes that about 1e-6.
  4. Remat "none" and "full", attention "xla" with "dots", then "dots" with telemetry on (the
     training loop's default).

Every step reads its loss on the host, as a training loop that logs each step does, on both sides.
FLOPs per token are counted as in benchmarks/train_throughput.py. MFU is measured against the
dense bf16 peak in benchmarks/scale.py's PEAK_FLOPS.

`--smoke` runs the same at a tiny shape on whatever device there is, to check the script itself
(tests/test_accelerator_benchmark.py).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

PRESET = Path(__file__).resolve().parents[1] / "configs" / "gpt2_small.py"
SMOKE = dict(n_layers=2, d_model=64, n_heads=2, n_ctx=32, vocab_size=256)
# name: (what, worker, options), in order of importance
PLAN = {
    "dots": ("resstream, cuDNN/auto, remat dots", "train", {"attention": "auto", "remat": "dots"}),
    "nanogpt": ("nanoGPT, torch.compile, bf16", "torch", {}),
    "analysis": ("analysis", "analysis", {}),
    "none": ("resstream, remat none", "train", {"attention": "auto", "remat": "none"}),
    "full": ("resstream, remat full", "train", {"attention": "auto", "remat": "full"}),
    "xla": ("resstream, XLA attention, remat dots", "train", {"attention": "xla", "remat": "dots"}),
    "telemetry": (
        "resstream, remat dots, telemetry on",
        "train",
        {"attention": "auto", "remat": "dots", "telemetry": True},
    ),
}


def model_config(smoke: bool, **overrides: object):
    """configs/gpt2_small.py's ModelConfig (with SMOKE's shape for `smoke`), `overrides` applied."""
    from resstream.config import ModelConfig

    spec = importlib.util.spec_from_file_location("gpt2_small", PRESET)
    preset = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(preset)
    return ModelConfig.from_dict(dict(preset.get_config().model) | (SMOKE if smoke else {}) | overrides)


def _peak(device_kind: str) -> float | None:
    sys.path.insert(0, str(Path(__file__).parent))
    from scale import PEAK_FLOPS

    # "NVIDIA H200 141GB HBM3e" and the like: the longest known name it starts with
    known = [name for name in PEAK_FLOPS if device_kind.startswith(name)]
    return PEAK_FLOPS[max(known, key=len)] if known else None


def _flops_per_token(smoke: bool) -> float:
    from train_throughput import flops_per_token

    cfg = model_config(smoke)
    return flops_per_token(cfg, cfg.n_ctx)


def train_worker(smoke: bool, batch: int, steps: int, attention: str, remat: str, telemetry: bool = False) -> dict:
    """resstream's train step: compile seconds, then the median seconds of `steps` steps."""
    import jax
    from flax import nnx

    from resstream import Transformer
    from resstream.train import OptimizerConfig, init_state, make_optimizer, train_step

    cfg = model_config(smoke, remat=remat, attention=attention)
    optimizer = make_optimizer(OptimizerConfig(total_steps=10_000))
    graphdef, state = init_state(Transformer(cfg, rngs=nnx.Rngs(0)), optimizer, 0)
    batches = [jax.random.randint(jax.random.key(i), (1, batch, cfg.n_ctx + 1), 0, cfg.vocab_size) for i in range(2)]
    kw = {"graphdef": graphdef, "optimizer": optimizer, "telemetry": telemetry}
    start = time.perf_counter()
    step = train_step.lower(state, batches[0], **kw).compile()
    compile_s = time.perf_counter() - start
    times = []
    for i in range(steps + 1):  # the first step is a warm-up
        start = time.perf_counter()
        state, metrics = step(state, batches[i % 2])
        float(metrics["loss"])
        times.append(time.perf_counter() - start)
    device = jax.devices()[0]
    return {"compile_s": compile_s, "step_s": statistics.median(times[1:]), "device": device.device_kind}


def torch_worker(smoke: bool, batch: int, steps: int) -> dict:
    """nanoGPT's train step compiled by PyTorch: first step (with the compile), then the median."""
    import torch
    from nanogpt_torch import GPT, make_train_step

    cfg = model_config(smoke)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cpu" and not smoke:
        raise SystemExit("RuntimeError: no CUDA device for PyTorch: nanoGPT is measured on a GPU only")
    torch.manual_seed(0)
    model = GPT(cfg.vocab_size, cfg.n_ctx, cfg.n_layers, cfg.d_model, cfg.n_heads).to(device)
    on_gpu = device == "cuda"
    if on_gpu:
        torch.set_float32_matmul_precision("high")
        model = torch.compile(model)
    step = make_train_step(model, device=device, bf16=on_gpu)
    data = torch.randint(0, cfg.vocab_size, (2, batch, cfg.n_ctx + 1), device=device)
    times = []
    for i in range(steps + 2):
        start = time.perf_counter()
        step(data[i % 2, :, :-1], data[i % 2, :, 1:])
        times.append(time.perf_counter() - start)
    kind = torch.cuda.get_device_name() if on_gpu else "cpu"
    return {"compile_s": times[0], "step_s": statistics.median(times[2:]), "device": kind, "compiled": on_gpu}


def analysis_worker(smoke: bool, steps: int) -> dict:
    """First call and median later call of each analysis call on [1, n_ctx] tokens."""
    import jax
    from flax import nnx

    from resstream import Transformer, analysis
    from resstream.ablation import ablation_sweep

    cfg = model_config(smoke)
    model = Transformer(cfg, rngs=nnx.Rngs(0))
    tokens = jax.random.randint(jax.random.key(1), (1, cfg.n_ctx), 0, cfg.vocab_size)
    cache = None  # made by the first call, timed
    targets = jax.numpy.roll(tokens, -1, axis=1)

    def run_with_cache():
        nonlocal cache
        _, cache = model.run_with_cache(tokens)
        return cache

    calls = {
        "run_with_cache": run_with_cache,
        "decompose_logits + logit_attrs": lambda: (
            analysis.decompose_logits(model, cache, split_heads=True, pos=-1).values,
            analysis.logit_attrs(model, cache, targets, split_heads=True).values,
        ),
        f"ablation_sweep(heads), {cfg.n_layers * cfg.n_heads} ablations": lambda: (
            ablation_sweep(model, tokens, "heads", direct=False).total
        ),
    }
    out = {}
    for name, call in calls.items():
        start = time.perf_counter()
        jax.block_until_ready(call())
        first = time.perf_counter() - start
        times = []
        for _ in range(max(steps // 2, 2)):
            start = time.perf_counter()
            jax.block_until_ready(call())
            times.append(time.perf_counter() - start)
        out[name] = {"first_s": first, "median_s": statistics.median(times)}
    out["exactness"] = {cfg.dtype: decomposition_error(model, tokens)}
    float32 = Transformer(model_config(smoke, dtype="float32"), rngs=nnx.Rngs(0))
    out["exactness"]["float32"] = decomposition_error(float32, tokens)
    return out


def decomposition_error(model, tokens) -> float:
    """max |sum of decompose_logits rows - logits| / max |logits| at the last position."""
    import jax.numpy as jnp

    from resstream import analysis

    logits, cache = model.run_with_cache(tokens)
    rows = analysis.decompose_logits(model, cache, pos=-1).values
    last = logits[:, -1].astype(jnp.float32)
    return float(jnp.max(jnp.abs(rows.sum(0) - last)) / jnp.max(jnp.abs(last)))


def _run_worker(args: argparse.Namespace, name: str, timeout: float) -> dict:
    """PLAN[name] in a fresh process, within `timeout` seconds: its JSON, or {"error": why}."""
    command = [sys.executable, __file__, "--worker", name, "--batch", str(args.batch), "--steps", str(args.steps)]
    command += ["--smoke"] * args.smoke
    path = os.pathsep.join(p for p in (str(Path(__file__).resolve().parents[1]), os.environ.get("PYTHONPATH")) if p)
    env = {**os.environ, "PYTHONPATH": path, "PYTHONWARNINGS": "ignore"}
    try:
        proc = subprocess.run(command, env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"error": f"ran out of the time budget ({timeout:.0f} s left for it)"}
    if proc.returncode:
        lines = [line for line in proc.stderr.splitlines() if line.strip()] or ["(no output)"]
        raised = [line for line in lines if re.match(r"[\w.]+(Error|Exception)\b", line)]
        return {"error": f"exit status {proc.returncode}: {(raised or lines)[-1][:600]}"}
    try:
        return json.loads(proc.stdout.strip().splitlines()[-1])
    except (IndexError, json.JSONDecodeError):
        return {"error": f"no result line in its output: {proc.stdout.strip()[-300:]!r}"}


def _report(what: str, result: dict, smoke: bool, batch: int) -> str:
    if "error" in result:
        return f"{what:40} FAILED: {result['error']}"
    if what == "analysis":
        exactness = result.pop("exactness")
        lines = [
            f"  {name:44} first call {r['first_s']:7.2f} s   then {1e3 * r['median_s']:9.2f} ms"
            for name, r in result.items()
        ]
        errors = ", ".join(f"{dtype} model {error:.1e}" for dtype, error in exactness.items())
        return "\n".join([*lines, f"  decomposition - logits, relative: {errors} (float32: about 1e-6 expected)"])
    tokens_per_s = batch * model_config(smoke).n_ctx / result["step_s"]
    peak = _peak(result["device"])
    mfu = f"MFU {_flops_per_token(smoke) * tokens_per_s / peak:6.1%}" if peak else f"(no peak for {result['device']})"
    first = "compile"
    if "compiled" in result:
        first = "first step" if result["compiled"] else "(eager: no CUDA) first step"
    return (
        f"{what:40} {1e3 * result['step_s']:9.1f} ms/step {tokens_per_s:11,.0f} tokens/s  {mfu}"
        f"   {first} {result['compile_s']:6.1f} s   on {result['device']}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=16, help="micro-batch of the train steps (sequences)")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--budget-s", type=float, default=420.0, help="wall-clock seconds for the whole run")
    parser.add_argument("--smoke", action="store_true", help="a tiny shape, to check the script on any device")
    parser.add_argument("--only", default=",".join(PLAN), help=f"which of {','.join(PLAN)} to run (default: all)")
    parser.add_argument("--worker", choices=list(PLAN), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker is not None:
        _, kind, options = PLAN[args.worker]
        if kind == "train":
            result = train_worker(args.smoke, args.batch, args.steps, **options)
        elif kind == "torch":
            result = torch_worker(args.smoke, args.batch, args.steps)
        else:
            result = analysis_worker(args.smoke, args.steps)
        print(json.dumps(result))
        return

    wanted = args.only.split(",")
    if unknown := [name for name in wanted if name not in PLAN]:
        parser.error(f"--only: {', '.join(unknown)}: not among {', '.join(PLAN)}")
    deadline = time.monotonic() + args.budget_s
    have_torch = importlib.util.find_spec("torch") is not None
    cfg = model_config(args.smoke)
    print(
        f"{cfg.n_layers} layers x d_model {cfg.d_model} x {cfg.n_heads} heads, context {cfg.n_ctx}, "
        f"vocab {cfg.vocab_size}, {cfg.dtype} compute; micro-batch {args.batch}, {args.steps} timed steps, "
        f"budget {args.budget_s:.0f} s",
        flush=True,
    )
    for name in [name for name in PLAN if name in wanted]:
        what, kind, _ = PLAN[name]
        left = deadline - time.monotonic()
        if kind == "torch" and not have_torch:
            print(f"{what:40} skipped: torch is not installed", flush=True)
            continue
        if left < 10:
            print(f"{what:40} skipped: the time budget is spent", flush=True)
            continue
        result = _run_worker(args, name, left)
        if kind == "analysis" and "error" not in result:
            print("analysis, first call (compile) and the median of later calls:")
        print(_report(what, result, args.smoke, args.batch), flush=True)


if __name__ == "__main__":
    main()
