"""Memory benchmark: the compiled peak of every analysis call at GPT-2-small size, against a budget.

    python benchmarks/memory.py [--budget-gib 8] [--layers 12] [--seq 1024] [--vocab 50257]

Nothing runs and nothing the size of the model is allocated: the model is abstract
(`nnx.eval_shape`), and under `resstream.memory.measure_only()` each call compiles its program and
records XLA's own account of its peak (`compiled.memory_analysis()`: arguments + outputs +
temporaries), with the plan (lanes carried, lanes evaluated at once) the budget led it to. So this
works on CPU for shapes this machine could never run. Every call must fit the budget (default 8 GiB,
a consumer GPU); the script exits 1 if one does not.
"""

from __future__ import annotations

import argparse
import sys
import time

import jax.numpy as jnp
import numpy as np
from flax import nnx

from resstream import ModelConfig, Transformer, analysis
from resstream.ablation import ablation_sweep, deletion_curve
from resstream.memory import MemoryBudgetError, gib, measure_only
from resstream.patching import patch_resid


def calls(model: Transformer, tokens: np.ndarray, budget: int) -> dict:
    """Each call of the analysis API, as name -> thunk, all at `budget` bytes."""
    last = tokens.shape[1] - 1
    kw = {"memory_budget": budget}
    box = {}

    def cache():
        box["cache"] = model.run_with_cache(tokens, **kw)[1]

    return {
        "run_with_cache": cache,
        "decompose_logits(pos=-1)": lambda: analysis.decompose_logits(model, box["cache"], pos=last, **kw),
        "decompose_logits(split_heads, pos=-1)": lambda: analysis.decompose_logits(
            model, box["cache"], split_heads=True, pos=last, **kw
        ),
        "logit_attrs(split_heads, all positions)": lambda: analysis.logit_attrs(
            model, box["cache"], tokens, split_heads=True, **kw
        ),
        "logit_lens(all positions)": lambda: analysis.logit_lens(model, box["cache"], **kw),
        "head_results(all layers)": lambda: analysis.head_results(model, box["cache"], **kw),
        "ablation_sweep(layers)": lambda: ablation_sweep(model, tokens, "layers", **kw),
        "ablation_sweep(sublayers)": lambda: ablation_sweep(model, tokens, "sublayers", **kw),
        "ablation_sweep(heads)": lambda: ablation_sweep(model, tokens, "heads", **kw),
        "deletion_curve(draws=16)": lambda: deletion_curve(model, tokens, draws=16, **kw),
        "patch_resid(every layer x position)": lambda: patch_resid(model, tokens, tokens[:, ::-1].copy(), 1, 2, **kw),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--budget-gib", type=float, default=8.0)
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--d-model", type=int, default=768)
    parser.add_argument("--heads", type=int, default=12)
    parser.add_argument("--seq", type=int, default=1024)
    parser.add_argument("--vocab", type=int, default=50257)
    parser.add_argument("--batch", type=int, default=1)
    args = parser.parse_args()
    cfg = ModelConfig(
        vocab_size=args.vocab, n_layers=args.layers, d_model=args.d_model, n_heads=args.heads, n_ctx=args.seq
    )
    model = nnx.eval_shape(lambda: Transformer(cfg, rngs=nnx.Rngs(0)))
    tokens = np.asarray(jnp.arange(args.batch * args.seq).reshape(args.batch, args.seq) % args.vocab, np.int32)
    budget = int(args.budget_gib * 2**30)
    print(
        f"{args.layers} layers x d_model {args.d_model}, {args.heads} heads, vocab {args.vocab}, tokens "
        f"{args.batch} x {args.seq}; budget {gib(budget)}; compiled peak by XLA's memory_analysis()"
    )
    print(f"{'call':40} {'peak':>10} {'of budget':>9} {'plan (lanes, chunk)':>20} {'compile':>8}")
    failed = 0
    for name, call in calls(model, tokens, budget).items():
        start = time.perf_counter()
        try:
            with measure_only() as measured:
                call()
        except MemoryBudgetError as err:
            print(f"{name:40} does not fit: {err}")
            failed += 1
            continue
        m = measured[-1]
        plan = "" if m.plan is None else f"{m.plan.lanes}, {m.plan.chunk}"
        seconds = time.perf_counter() - start
        print(f"{name:40} {gib(m.peak):>10} {m.peak / budget:9.2f} {plan:>20} {seconds:7.1f}s", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
