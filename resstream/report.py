"""The end of a finished run: its plots, samples and report.md."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import jax.numpy as jnp

from resstream import analysis
from resstream.config import ModelConfig
from resstream.data import ByteTokenizer, Tokenizer
from resstream.model import Transformer
from resstream.sampling import generate
from resstream.telemetry import plot_run


def write_report(
    config: Any,
    cfg: ModelConfig,
    model: Transformer,
    step: int,
    val_batches: list,
    run_dir: Path,
    val: float,
    tokenizer: Tokenizer | None = None,
    val_bits_per_byte: float | None = None,
) -> dict[str, Any]:
    """Plots, samples (in the run's `tokenizer`, default bytes) and report.md of a finished run:
    validation loss (per token, and `val_bits_per_byte` when given: bytes for a byte-level run) and
    per-layer direct logit attribution on one validation batch; returns what the run's summary adds."""
    plots = [p.name for p in plot_run(run_dir)]
    tokenizer = tokenizer or ByteTokenizer()
    if val_bits_per_byte is None and isinstance(tokenizer, ByteTokenizer):
        val_bits_per_byte = val / math.log(2)
    prompts = ["def ", "class ", "import "]
    samples = []
    for prompt in prompts if config.train.sample_tokens > 0 else []:  # 0: no samples
        out = generate(
            model,
            tokenizer.encode(prompt)[None],
            config.train.sample_tokens,
            temperature=0.8,
            top_k=40,
            seed=config.train.seed,
        )
        samples.append(tokenizer.decode(out[0]))
    if samples:
        (run_dir / "samples.txt").write_text("\n\n----\n\n".join(samples))

    batch = val_batches[0]
    _, cache = model.run_with_cache(batch[:, :-1])
    attrs = analysis.logit_attrs(model, cache, batch[:, 1:])
    per_component = {label: float(jnp.mean(v)) for label, v in attrs}
    per_layer = {
        layer: sum(v for k, v in per_component.items() if k.startswith(f"{layer}_")) for layer in range(cfg.n_layers)
    }
    lines = [
        f"# Run report: {run_dir}",
        "",
        f"validation loss: {val:.4f} nats/token ({val / math.log(2):.4f} bits/token"
        + ("" if val_bits_per_byte is None else f", {val_bits_per_byte:.4f} bits/byte")
        + f") after {step} steps; tokenizer: {_describe(config, tokenizer)}",
        "",
        "## Direct logit attribution to the correct next token (mean over one validation batch)",
        "",
        "| component | attribution |",
        "|---|---|",
        *[f"| {k} | {v:+.4f} |" for k, v in per_component.items()],
        "",
        "| layer (attention + MLP) | attribution |",
        "|---|---|",
        *[f"| {k} | {v:+.4f} |" for k, v in per_layer.items()],
        "",
        f"plots: {', '.join(plots)}" + ("; samples: samples.txt" if samples else ""),
    ]
    (run_dir / "report.md").write_text("\n".join(lines) + "\n")
    bits = {} if val_bits_per_byte is None else {"val_bits_per_byte": val_bits_per_byte}
    return {"val_loss_bits": val / math.log(2), **bits, "direct_logit_attribution_by_layer": per_layer, "plots": plots}


def _describe(config: Any, tokenizer: Tokenizer) -> str:
    """data.tokenizer and its vocabulary size, e.g. "bpe:4096 (4096 tokens)"."""
    return f"{config.data.get('tokenizer', 'bytes')} ({tokenizer.vocab_size} tokens)"
