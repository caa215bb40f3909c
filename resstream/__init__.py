"""resstream: a small transformer LM in JAX whose residual stream is data you can decompose."""

from resstream import analysis
from resstream.config import ConfigError, ModelConfig
from resstream.model import Cache, TokenError, Transformer, check_tokens
from resstream.stream import ResidualStream

__all__ = [
    "Cache",
    "ConfigError",
    "ModelConfig",
    "ResidualStream",
    "TokenError",
    "Transformer",
    "analysis",
    "check_tokens",
]
__version__ = "0.1.0"
