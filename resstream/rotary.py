"""Rotary position embeddings (rotate-half, as GPT-NeoX, Llama and the Hugging Face models lay them
out): the frequency of each rotated pair, with the long-context scalings that checkpoints bring, the
cos/sin tables, and their application to queries and keys."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from resstream.config import ModelConfig


def inverse_frequencies(cfg: ModelConfig) -> np.ndarray:
    """The angle per position of each rotated pair i (0 .. rotary_dims/2 - 1), float64 [rotary_dims/2]:
    rotary_base^(-2i / rotary_dims), then scaled as `cfg.rope_scaling` says."""
    dims = cfg.rotary_dims
    inv_freq = cfg.rotary_base ** (-np.arange(0, dims, 2, dtype=np.float64) / dims)
    if cfg.rope_scaling == "linear":
        return inv_freq / cfg.rope_factor
    if cfg.rope_scaling == "llama3":
        # Llama 3.1: wavelengths longer than the original context / low_freq_factor are stretched by
        # rope_factor, those shorter than original / high_freq_factor are kept, and those in between
        # are blended linearly in original / wavelength.
        wavelength = 2 * np.pi / inv_freq
        long = wavelength > cfg.rope_original_n_ctx / cfg.rope_low_freq_factor
        short = wavelength < cfg.rope_original_n_ctx / cfg.rope_high_freq_factor
        low, high = cfg.rope_low_freq_factor, cfg.rope_high_freq_factor
        smooth = (cfg.rope_original_n_ctx / wavelength - low) / (high - low)
        blended = (1 - smooth) * inv_freq / cfg.rope_factor + smooth * inv_freq
        return np.where(long, inv_freq / cfg.rope_factor, np.where(short, inv_freq, blended))
    return inv_freq


def rotary_tables(seq: int, cfg: ModelConfig) -> tuple[jax.Array, jax.Array]:
    """cos and sin tables [seq, rotary_dims] (float32, computed in float64): position t, pair i at
    columns i and i + rotary_dims/2."""
    angles = np.arange(seq, dtype=np.float64)[:, None] * inverse_frequencies(cfg)[None, :]
    angles = np.concatenate([angles, angles], axis=-1)
    return jnp.asarray(np.cos(angles), jnp.float32), jnp.asarray(np.sin(angles), jnp.float32)


def apply_rotary(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """x [batch, seq, heads, d_head] with its first cos.shape[-1] dimensions rotated (cos, sin
    [seq, rotary_dims]); the rest pass through (partial rotary)."""
    dims = cos.shape[-1]
    rot, rest = x[..., :dims], x[..., dims:]
    half = dims // 2
    rotated = jnp.concatenate([-rot[..., half:], rot[..., :half]], axis=-1)
    cos, sin = cos[:, None, :], sin[:, None, :]
    out = (rot.astype(jnp.float32) * cos + rotated.astype(jnp.float32) * sin).astype(x.dtype)
    return out if dims == x.shape[-1] else jnp.concatenate([out, rest], axis=-1)
