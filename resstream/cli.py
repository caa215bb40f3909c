"""Command line: for now, a forward pass and an exact decomposition on real text.

The training loop is not built yet, so the model's weights are random: the point of this command
today is to show the pipeline (bytes -> model -> cache -> exact attribution) end to end.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import sys
import sysconfig
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from resstream import analysis
from resstream.config import ConfigError, ModelConfig
from resstream.model import Transformer


def load_config(path: str, overrides: list[str]) -> ModelConfig:
    """Load `get_config()` from a Python file and apply `field=value` overrides."""
    file = Path(path)
    if not file.is_file():
        raise SystemExit(
            f"config file {path} not found: pass one of {sorted(str(p) for p in Path('configs').glob('*.py'))}"
        )
    spec = importlib.util.spec_from_file_location(file.stem, file)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    cfg = module.get_config()
    fields = {f.name: f for f in dataclasses.fields(ModelConfig)}
    updates = {}
    for item in overrides:
        name, sep, value = item.partition("=")
        name = name.removeprefix("--").removeprefix("model.")
        if not sep or name not in fields:
            raise SystemExit(f"override {item!r} is not FIELD=VALUE with FIELD one of {sorted(fields)}")
        current = getattr(cfg, name)
        if isinstance(current, bool):
            updates[name] = value.lower() in ("1", "true", "yes")
        elif current is None or isinstance(current, int):
            try:
                updates[name] = None if value.lower() == "none" else int(value)
            except ValueError:
                raise SystemExit(f"override {item!r}: {name} takes an integer") from None
        else:
            try:
                updates[name] = type(current)(value)
            except ValueError:
                raise SystemExit(f"override {item!r}: {name} takes a {type(current).__name__}") from None
    try:
        return dataclasses.replace(cfg, **updates)
    except ConfigError as err:
        raise SystemExit(f"invalid config: {err}") from None


def stdlib_text(n_bytes: int) -> bytes:
    """Real text available on every machine: this interpreter's own standard-library sources."""
    files = sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py"))
    data = b""
    for file in files:
        data += file.read_bytes()
        if len(data) >= n_bytes:
            return data[:n_bytes]
    raise SystemExit(f"found only {len(data)} bytes of standard-library source under {sysconfig.get_paths()['stdlib']}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="resstream: forward pass + exact logit decomposition (random weights)")
    parser.add_argument("--config", default="configs/default.py")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seed", type=int, default=0)
    args, overrides = parser.parse_known_args(argv)
    cfg = load_config(args.config, overrides)

    print("NOTE: the training loop is not built yet; this runs the model with RANDOM weights on real text")
    print(f"config {args.config}: {cfg}")
    model = Transformer(cfg, rngs=nnx.Rngs(args.seed))
    text = np.frombuffer(stdlib_text(args.batch * cfg.n_ctx + 1), dtype=np.uint8).astype(np.int32)
    tokens = jnp.asarray(text[:-1].reshape(args.batch, cfg.n_ctx))
    targets = jnp.asarray(text[1:].reshape(args.batch, cfg.n_ctx))

    logits, cache = model.run_with_cache(tokens)
    loss = -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), targets[..., None], -1))
    print(
        f"tokens {tuple(tokens.shape)} from the standard library's sources; loss {float(loss):.4f} nats/byte "
        f"(uniform over {cfg.vocab_size}: {np.log(cfg.vocab_size):.4f})"
    )

    decomposition = analysis.decompose_logits(model, cache)
    error = float(jnp.max(jnp.abs(decomposition.sum() - logits)) / jnp.max(jnp.abs(logits)))
    print(f"decompose_logits: {len(decomposition)} components sum back to the logits (max relative error {error:.1e})")

    attrs = analysis.logit_attrs(model, cache, targets)
    lens = analysis.logit_lens(model, cache)
    lens_loss = -jnp.mean(
        jnp.take_along_axis(
            jax.nn.log_softmax(lens.values),
            jnp.broadcast_to(targets[None, ..., None], (*lens.values.shape[:-1], 1)),
            -1,
        ),
        axis=(1, 2, 3),
    )
    print("\ndirect logit attribution to the next byte (mean over positions) and logit-lens loss:")
    for label, value in attrs:
        print(f"  {label:12s} {float(jnp.mean(value)):+.5f}")
    for label, value in zip(lens.labels, lens_loss, strict=True):
        print(f"  lens {label:7s} {float(value):.4f} nats/byte")


if __name__ == "__main__":
    main(sys.argv[1:])
