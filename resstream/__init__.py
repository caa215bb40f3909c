"""resstream: a small transformer LM in JAX whose residual stream is data you can decompose.

>>> from resstream import ModelConfig, Transformer, analysis, load_run
>>> model, tokenizer, config = load_run("runs/default")
>>> logits, cache = model.run_with_cache(tokens)
>>> analysis.decompose_logits(model, cache, pos=-1)        # a Labelled stack of components
"""

from resstream import ablation, analysis, patching
from resstream.analysis import Labelled
from resstream.config import ConfigError, ModelConfig
from resstream.interventions import Ablation, Replacement
from resstream.model import Cache, TokenError, Transformer
from resstream.runs import load_run
from resstream.sampling import generate

__all__ = [
    "Ablation",
    "Cache",
    "ConfigError",
    "Labelled",
    "ModelConfig",
    "Replacement",
    "TokenError",
    "Transformer",
    "ablation",
    "analysis",
    "generate",
    "load_run",
    "patching",
]
__version__ = "0.1.0"
