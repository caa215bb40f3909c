"""Device policy: what the model computes with on the device it runs on (model.py holds the maths)."""

from __future__ import annotations

from typing import Any

import jax

from resstream.config import ConfigError, ModelConfig


def attention_implementation(cfg: ModelConfig, device: Any = None) -> str:
    """The attention implementation (`resstream.attention.causal_attention`) for `cfg` on `device`
    (default: the first device): `cfg.attention` unless "auto", which takes "cudnn" on an NVIDIA GPU
    when cuDNN's fused attention takes the shapes (16-bit compute, d_head a multiple of 8 up to 128),
    else "xla" (XLA ops with a flash-style backward)."""
    device = jax.devices()[0] if device is None else device
    nvidia = device.platform in ("gpu", "cuda") and "nvidia" in device.device_kind.lower()
    if cfg.attention == "cudnn" and not nvidia:
        raise ConfigError(
            f"attention='cudnn' needs an NVIDIA GPU, but the device is {device.device_kind!r}: "
            "use attention='auto' (cuDNN where it applies, XLA's elsewhere) or 'xla'"
        )
    if cfg.attention != "auto":
        return cfg.attention
    return "cudnn" if nvidia and cfg.cudnn_fits else "xla"
