"""resstream against TransformerLens on the same weights: run_with_cache, the per-component logits
with direct logit attribution, and a zero-ablation sweep of every sublayer.

    python benchmarks/vs_transformerlens.py [--reps 6] [--rounds 3] [--shapes small,big]

Needs `torch` and `transformer-lens<4` (HookedTransformer), neither a dependency of resstream:
    pip install torch==2.13.0 "transformer-lens<4"
Without them it says so and prints resstream's column alone.

The same model (the forward benchmark's shapes, GPT-2 blocks) is loaded into a HookedTransformer
with its LayerNorms folded (TransformerLens's exact path to per-component logits; the logits are
unchanged), and the two are checked to agree before anything is timed. What each side runs:
  run_with_cache   ours: `model.run_with_cache(tokens)`; TL: `model.run_with_cache(tokens)`
  decompose+attrs  ours: `decompose_logits(model, cache)` and `logit_attrs(model, cache, targets)`;
                   TL: `cache.decompose_resid()`, `cache.apply_ln_to_stack(...) @ W_U`, and
                   `cache.logit_attrs(stack, targets)`
  sweep            ours: `ablation_sweep(model, tokens, "sublayers", direct=False)`; TL: the baseline
                   loss and one `run_with_hooks` per sublayer with its hook_{attn,mlp}_out zeroed
Each framework times its calls in a process of its own (in one process, PyTorch's threads
spin-waiting after a call slowed the JAX call after it, and making them passive slowed PyTorch),
the two alternating for `--rounds` rounds; medians. TL under torch.inference_mode. Printed: the
times and TL / ours.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import statistics
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from forward import SHAPES, config, time_interleaved
from processes import run_json

from resstream import Transformer, analysis
from resstream import ablation as ablation_api

HAVE_TL = all(importlib.util.find_spec(name) for name in ("torch", "transformer_lens"))


def hooked_transformer(model: Transformer):
    """`model`'s weights in a TransformerLens HookedTransformer, LayerNorms folded."""
    import torch
    from transformer_lens import HookedTransformer, HookedTransformerConfig

    cfg = model.cfg
    tl_cfg = HookedTransformerConfig(
        n_layers=cfg.n_layers, d_model=cfg.d_model, n_ctx=cfg.n_ctx, d_head=cfg.d_head, n_heads=cfg.n_heads,
        d_mlp=cfg.d_mlp, d_vocab=cfg.vocab_size, act_fn="gelu_new", normalization_type="LN",
        positional_embedding_type="standard", eps=cfg.norm_eps, device="cpu",
    )  # fmt: skip
    state = {"embed.W_E": model.W_E, "pos_embed.W_pos": model.W_pos, "unembed.W_U": model.W_U}
    state |= {"unembed.b_U": model.b_U, "ln_final.w": model.ln_final.w, "ln_final.b": model.ln_final.b}
    blocks = model.blocks
    for layer in range(cfg.n_layers):
        for name, param in {
            "ln1.w": blocks.ln1.w, "ln1.b": blocks.ln1.b, "ln2.w": blocks.ln2.w, "ln2.b": blocks.ln2.b,
            **{f"attn.{n}": getattr(blocks.attn, n) for n in ("W_Q", "W_K", "W_V", "W_O", "b_Q", "b_K", "b_V", "b_O")},
            **{f"mlp.{n}": getattr(blocks.mlp, n) for n in ("W_in", "b_in", "W_out", "b_out")},
        }.items():  # fmt: skip
            state[f"blocks.{layer}.{name}"] = param[layer]
    state = {name: torch.from_numpy(np.array(param[...], np.float32)) for name, param in state.items()}
    hooked = HookedTransformer(tl_cfg)
    hooked.load_and_process_state_dict(state, fold_ln=True, center_writing_weights=False, center_unembed=False)
    return hooked.eval()


def ours(model: Transformer, tokens: jax.Array, targets: jax.Array) -> dict[str, Callable[[], object]]:
    _, cache = model.run_with_cache(tokens)
    return {
        "run_with_cache": lambda: model.run_with_cache(tokens),
        "decompose+attrs": lambda: (
            analysis.decompose_logits(model, cache).values,
            analysis.logit_attrs(model, cache, targets).values,
        ),
        "sweep": lambda: ablation_api.ablation_sweep(model, tokens, "sublayers", direct=False).total,
    }


def theirs(hooked, tokens: np.ndarray, targets: np.ndarray) -> dict[str, Callable[[], object]]:
    import torch

    tokens, targets = torch.from_numpy(tokens).long(), torch.from_numpy(targets).long()
    with torch.inference_mode():
        _, cache = hooked.run_with_cache(tokens)
    zero = lambda x, hook: torch.zeros_like(x)  # noqa: E731
    hooks = [f"blocks.{layer}.hook_{kind}_out" for layer in range(hooked.cfg.n_layers) for kind in ("attn", "mlp")]

    @torch.inference_mode()
    def decompose_and_attrs():
        stack = cache.decompose_resid()
        logits = cache.apply_ln_to_stack(stack) @ hooked.W_U
        return logits, cache.logit_attrs(stack, targets)

    @torch.inference_mode()
    def sweep():
        baseline = hooked(tokens, return_type="loss")
        return [hooked.run_with_hooks(tokens, return_type="loss", fwd_hooks=[(h, zero)]) - baseline for h in hooks]

    return {
        "run_with_cache": torch.inference_mode()(lambda: hooked.run_with_cache(tokens)),
        "decompose+attrs": decompose_and_attrs,
        "sweep": sweep,
    }


def check_agreement(model: Transformer, hooked, tokens: jax.Array, targets: jax.Array) -> float:
    """Largest difference between the two models' logits, and between their sweeps' loss deltas."""
    ours_fns = ours(model, tokens, targets)
    theirs_fns = theirs(hooked, np.asarray(tokens), np.asarray(targets))
    logits_ours = np.asarray(ours_fns["run_with_cache"]()[0])
    logits_theirs = theirs_fns["run_with_cache"]()[0].numpy()
    sweep_ours = np.asarray(ours_fns["sweep"]())
    sweep_theirs = np.array([float(x) for x in theirs_fns["sweep"]()])
    return max(np.abs(logits_ours - logits_theirs).max(), np.abs(sweep_ours - sweep_theirs).max())


def inputs(name: str) -> tuple[Transformer, jax.Array, jax.Array]:
    """The model (the same weights in every process: seeded) and its tokens and targets at `name`."""
    shape = SHAPES[name]
    model = Transformer(config(shape), rngs=nnx.Rngs(0))
    tokens = jax.random.randint(jax.random.key(1), (shape["batch"], shape["seq"]), 0, model.cfg.vocab_size)
    return model, tokens, jnp.roll(tokens, -1, axis=1)


def worker(framework: str, name: str, reps: int) -> dict[str, float]:
    """Median seconds of each operation for one framework, in this process alone."""
    model, tokens, targets = inputs(name)
    if framework == "resstream":
        fns = ours(model, tokens, targets)
    else:
        fns = theirs(hooked_transformer(model), np.asarray(tokens), np.asarray(targets))
    return time_interleaved(fns, reps)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--reps", type=int, default=6)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--shapes", default="small,big")
    parser.add_argument("--worker", choices=("resstream", "transformerlens"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(args.worker, args.shapes, args.reps)))
        return
    frameworks = ["resstream", "transformerlens"] if HAVE_TL else ["resstream"]
    if HAVE_TL:
        from importlib.metadata import version

        print(f"jax {jax.__version__}, torch {version('torch')}, transformer-lens {version('transformer-lens')}")
        for name in args.shapes.split(","):
            model, tokens, targets = inputs(name)
            agree = check_agreement(model, hooked_transformer(model), tokens, targets)
            print(f"{name}: logits and sweep deltas agree to {agree:.1e}")
    else:
        print("torch or transformer-lens<4 is missing: resstream's column alone")
    results: dict[tuple[str, str], list[dict]] = {}
    for _ in range(args.rounds):
        for name in args.shapes.split(","):
            reps = max(2, args.reps // 3) if name == "big" else args.reps
            for framework in frameworks:
                results.setdefault((framework, name), []).append(
                    run_json(__file__, "--worker", framework, "--shapes", name, "--reps", str(reps))
                )
    print(f"medians over {args.rounds} rounds, each framework in its own process")
    print(f"{'shape':6} {'operation':16} {'TransformerLens':>15} {'resstream':>10} {'TL / ours':>9}")
    for name in args.shapes.split(","):
        for op in ("run_with_cache", "decompose+attrs", "sweep"):
            mine = statistics.median(r[op] for r in results[("resstream", name)])
            if HAVE_TL:
                tl = statistics.median(r[op] for r in results[("transformerlens", name)])
                print(f"{name:6} {op:16} {1e3 * tl:13.1f}ms {1e3 * mine:8.1f}ms {tl / mine:9.2f}")
            else:
                print(f"{name:6} {op:16} {'-':>15} {1e3 * mine:8.1f}ms {'-':>9}")
    print("TL / ours: how many times faster resstream is (target: at least 2 for decompose+attrs and the sweep)")


if __name__ == "__main__":
    main()
