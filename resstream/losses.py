"""The next-token losses that training and the ablation experiments share."""

from __future__ import annotations

import jax
import optax


def cross_entropy(logits: jax.Array, targets: jax.Array) -> jax.Array:
    """Mean loss in nats; logits [batch, seq, vocab] float32, targets [batch, seq] int ids."""
    return optax.softmax_cross_entropy_with_integer_labels(logits, targets).mean()


def next_token_loss(logits: jax.Array, tokens: jax.Array) -> jax.Array:
    """Mean loss of predicting tokens[:, 1:] from logits[:, :-1] (the training loss); logits
    [batch, seq, vocab], tokens [batch, seq]."""
    return cross_entropy(logits[:, :-1], tokens[:, 1:])
