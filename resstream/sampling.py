"""Sampling from a model: greedy (temperature 0) or temperature with optional top-k."""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from resstream.model import Transformer


@functools.partial(jax.jit, static_argnames=("graphdef", "top_k"))
def _next_token(
    graphdef: Any,
    params: Any,
    window: jax.Array,
    pos: jax.Array,
    key: jax.Array,
    temperature: jax.Array,
    top_k: int | None,
) -> jax.Array:
    """The token after position `pos` of each row of `window` [batch, n_ctx]. The window has a
    fixed size (positions after `pos` are padding the causal mask hides), so one compile serves
    every step."""
    logits = nnx.merge(graphdef, params)(window)[:, pos]  # [batch, vocab]
    if top_k is not None:
        kth = jax.lax.top_k(logits, top_k)[0][:, -1:]
        logits = jnp.where(logits < kth, -jnp.inf, logits)
    greedy = jnp.argmax(logits, axis=-1)
    sampled = jax.random.categorical(key, logits / jnp.maximum(temperature, 1e-6), axis=-1)
    return jnp.where(temperature > 0, sampled, greedy).astype(jnp.int32)


def check_sampling(n_new: int, temperature: float, top_k: int | None, vocab_size: int) -> None:
    """ValueError, saying what to use instead, for options `generate` cannot honour."""
    if n_new < 0:
        raise ValueError(f"tokens to generate must be 0 or more, got {n_new}")
    if not temperature >= 0:  # also refuses NaN
        raise ValueError(f"temperature must be 0 (greedy) or positive, got {temperature}")
    if top_k is not None and not 1 <= top_k <= vocab_size:
        raise ValueError(f"top_k must be between 1 and the vocabulary size {vocab_size}, got {top_k}")


def generate(
    model: Transformer,
    prompt: np.ndarray,
    n_new: int,
    *,
    temperature: float = 1.0,
    top_k: int | None = None,
    seed: int = 0,
) -> np.ndarray:
    """prompt [batch, prompt_len] -> [batch, prompt_len + n_new]; the context slides once full."""
    prompt = np.atleast_2d(np.asarray(prompt, np.int32))
    if prompt.shape[0] == 0 or prompt.shape[1] == 0:
        raise ValueError(f"generate needs a prompt of at least one row of one token, got shape {prompt.shape}")
    check_sampling(n_new, temperature, top_k, model.cfg.vocab_size)
    n_ctx = model.cfg.n_ctx
    graphdef, params = nnx.split(model)
    tokens = prompt
    key = jax.random.PRNGKey(seed)
    for _ in range(n_new):
        context = tokens[:, -n_ctx:]
        window = np.zeros((tokens.shape[0], n_ctx), np.int32)
        window[:, : context.shape[1]] = context
        key, step_key = jax.random.split(key)
        nxt = _next_token(
            graphdef,
            params,
            jnp.asarray(window),
            jnp.asarray(context.shape[1] - 1),
            step_key,
            jnp.asarray(temperature, jnp.float32),
            top_k,
        )
        tokens = np.concatenate([tokens, np.asarray(nxt)[:, None]], axis=1)
    return tokens
