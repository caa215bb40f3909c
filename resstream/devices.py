"""Device policy: what the model computes with on the device it runs on (model.py holds the maths)."""

from __future__ import annotations

from typing import Any

import jax

from resstream.config import CUDNN_MAX_D_HEAD, ConfigError, ModelConfig


def attention_implementation(cfg: ModelConfig, device: Any = None) -> str:
    """The attention implementation (`resstream.attention.causal_attention`) for `cfg` on `device`
    (default: the first device): `cfg.attention` unless "auto", which takes "cudnn" on an NVIDIA GPU
    when cuDNN's fused attention takes the shapes (16-bit compute, d_head a multiple of 8 up to
    `cudnn_max_d_head(device)`), else "xla" (XLA ops with a flash-style backward)."""
    device = jax.devices()[0] if device is None else device
    nvidia = device.platform in ("gpu", "cuda") and "nvidia" in device.device_kind.lower()
    auto = "use attention='auto' (cuDNN where it applies, XLA's elsewhere) or 'xla'"
    if cfg.attention == "cudnn" and not nvidia:
        raise ConfigError(f"attention='cudnn' needs an NVIDIA GPU, but the device is {device.device_kind!r}: {auto}")
    fits = nvidia and cfg.cudnn_fits and cfg.d_head <= cudnn_max_d_head(device)
    if cfg.attention == "cudnn" and not fits:
        raise ConfigError(
            f"attention='cudnn' with d_head={cfg.d_head}: cuDNN's fused attention takes d_head up to "
            f"{cudnn_max_d_head(device)} on {device.device_kind!r} (256 needs compute capability 9.0, "
            f"Hopper, or later): {auto}"
        )
    if cfg.attention != "auto":
        return cfg.attention
    return "cudnn" if fits else "xla"


def cudnn_max_d_head(device: Any) -> int:
    """The largest d_head cuDNN's fused attention takes on the NVIDIA GPU `device`: 256 from
    compute capability 9.0 (Hopper) on, 128 before (the check jax.nn.dot_product_attention makes)."""
    try:
        major = int(str(getattr(device, "compute_capability", "")).split(".")[0])
    except ValueError:  # no capability reported: the limit every GPU takes
        return 128
    return CUDNN_MAX_D_HEAD if major >= 9 else 128
