"""What `resstream.hf`'s family tables share: the error, getters that read one HF tensor into one
resstream parameter, per-head reshapes of nn.Linear weights, rotary settings in both of config.json's
spellings, and the parts of an exported config.json that every family has."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

from resstream.config import ModelConfig


class HFError(ValueError):
    """A Hugging Face checkpoint that resstream cannot read, or a model it cannot write as one."""


Read = Callable[[str], np.ndarray]  # HF tensor name (without the base model's prefix) -> its array
Getter = Callable[[Read, int], np.ndarray]  # (read, layer) -> one resstream parameter (one layer's slice)
Params = Callable[[str], np.ndarray | None]  # resstream parameter name ("blocks.attn.W_Q") -> array or None

# HF activation names -> ModelConfig.mlp. The tanh ones are one formula written four ways.
GELUS = {
    "gelu_new": "gelu",
    "gelu_pytorch_tanh": "gelu",
    "gelu_python_tanh": "gelu",
    "gelu_fast": "gelu",
    "gelu": "gelu_exact",
    "gelu_python": "gelu_exact",
}
SILUS = ("silu", "swish")
ROPE_TYPES = {"default": "none", "linear": "linear", "llama3": "llama3"}


def refuse(field: str, value: Any, why: str) -> HFError:
    """The error for a config.json field whose value resstream does not compute."""
    return HFError(f"config.json {field}={value!r} is not supported: {why}")


def required(hf: dict, key: str) -> Any:
    """config.json's `key`; HFError when it is absent or null."""
    if hf.get(key) is None:
        raise HFError(f"config.json has no {key!r}: the checkpoint's config is incomplete")
    return hf[key]


def tensor(name: str, f: Callable[[np.ndarray], np.ndarray] = lambda a: a) -> Getter:
    """A getter of a parameter outside the blocks: HF tensor `name`, through `f`."""
    return lambda read, _layer: f(read(name))


def per_layer(template: str, f: Callable[[np.ndarray], np.ndarray] = lambda a: a) -> Getter:
    """A getter of one layer's slice of a block parameter: HF tensor `template.format(layer)`, through `f`."""
    return lambda read, layer: f(read(template.format(layer)))


def heads_in(d_head: int) -> Callable[[np.ndarray], np.ndarray]:
    """nn.Linear [heads * d_head, d_model] -> [heads, d_model, d_head]."""
    return lambda w: w.reshape(-1, d_head, w.shape[-1]).transpose(0, 2, 1)


def heads_out(d_head: int) -> Callable[[np.ndarray], np.ndarray]:
    """nn.Linear [d_model, heads * d_head] -> [heads, d_head, d_model]."""
    return lambda w: w.T.reshape(-1, d_head, w.shape[0])


def per_head(d_head: int) -> Callable[[np.ndarray], np.ndarray]:
    """nn.Linear bias [heads * d_head] -> [heads, d_head]."""
    return lambda b: b.reshape(-1, d_head)


# ------------------------------------------------------------------------------------------ rotary
def rope_fields(hf: dict, *, neox: bool) -> dict[str, Any]:
    """ModelConfig's rotary fields from config.json, in either spelling: transformers 5's
    `rope_parameters` dict, or the older top-level `rope_theta` + `rope_scaling` (GPT-NeoX:
    `rotary_emb_base`, `rotary_pct`) that hub checkpoints carry. Precedence as transformers 5.23:
    rope_scaling over rope_parameters, a key inside the dict over the top-level one."""
    field = "rope_scaling" if hf.get("rope_scaling") else "rope_parameters"
    params = hf.get(field) or {}
    if not isinstance(params, dict) or any(isinstance(v, dict) for v in params.values()):
        raise refuse(field, params, "only one rotary setting for every layer is supported")
    if neox:  # GPTNeoXConfig ignores a top-level rope_theta and defaults rotary_pct to 0.25
        theta = params.get("rope_theta", hf.get("rotary_emb_base", 10_000.0))
        fraction = params.get("partial_rotary_factor", hf.get("rotary_pct", 0.25))
    else:
        theta = params.get("rope_theta", hf.get("rope_theta", 10_000.0))
        fraction = params.get("partial_rotary_factor", hf.get("partial_rotary_factor", 1.0))
        if fraction != 1.0:
            raise refuse("partial_rotary_factor", fraction, "this family rotates all of each head's dimensions")
    kind = params.get("rope_type", params.get("type", "default"))
    if kind not in ROPE_TYPES:
        raise refuse(f"{field}.rope_type", kind, f"supported rotary scalings are {sorted(ROPE_TYPES)}")
    fields: dict[str, Any] = {"rotary_base": float(theta), "rope_scaling": ROPE_TYPES[kind]}
    if kind != "default":
        if params.get("factor") is None:
            raise HFError(f"config.json {field} of rope_type {kind!r} has no 'factor'")
        fields["rope_factor"] = float(params["factor"])
    if kind == "llama3":
        for key, name in (("low_freq_factor", "rope_low_freq_factor"), ("high_freq_factor", "rope_high_freq_factor")):
            if params.get(key) is None:
                raise HFError(f"config.json {field} of rope_type 'llama3' has no {key!r}")
            fields[name] = float(params[key])
        original = params.get("original_max_position_embeddings") or hf.get("original_max_position_embeddings")
        fields["rope_original_n_ctx"] = int(original or required(hf, "max_position_embeddings"))
    if neox:
        d_head = required(hf, "hidden_size") // required(hf, "num_attention_heads")
        rotary_dim = int(d_head * fraction)  # as GPTNeoXAttention computes it
        if rotary_dim <= 0 or rotary_dim % 2:
            why = f"it rotates {rotary_dim} of d_head={d_head} dimensions; need an even, positive number"
            raise refuse("rotary_pct (partial_rotary_factor)", fraction, why)
        fields["rotary_dim"] = None if rotary_dim == d_head else rotary_dim
    return fields


def rope_export(cfg: ModelConfig) -> dict[str, Any] | None:
    """The older `rope_scaling` spelling of cfg's scaling (read by transformers 4 and 5 alike)."""
    if cfg.rope_scaling == "none":
        return None
    scaling: dict[str, Any] = {"rope_type": cfg.rope_scaling, "factor": cfg.rope_factor}
    if cfg.rope_scaling == "llama3":
        scaling |= {
            "low_freq_factor": cfg.rope_low_freq_factor,
            "high_freq_factor": cfg.rope_high_freq_factor,
            "original_max_position_embeddings": cfg.rope_original_n_ctx,
        }
    return scaling


def gelu(hf: dict, key: str) -> str:
    """ModelConfig.mlp of the GELU that config.json's `key` names (GPT-2's default: the tanh one)."""
    act = hf.get(key, "gelu_new" if key == "activation_function" else "gelu")
    if act not in GELUS:
        raise refuse(key, act, f"supported activations are {sorted(GELUS)}")
    return GELUS[act]


def common_export(cfg: ModelConfig, model_type: str, architecture: str) -> dict[str, Any]:
    """The config.json fields every exported family has."""
    return {
        "model_type": model_type,
        "architectures": [architecture],
        "vocab_size": cfg.vocab_size,
        "tie_word_embeddings": cfg.tied_embeddings,
        "dtype": cfg.param_dtype,
        # the families' default special-token ids lie outside a small vocabulary: none is used here
        "bos_token_id": None,
        "eos_token_id": None,
        "pad_token_id": None,
    }


def zeros_if_none(p: Params, cfg: ModelConfig) -> Callable[[str, int, tuple[int, ...]], np.ndarray]:
    """A layer's bias, or zeros [shape] where the model has none (the family always has one)."""

    def bias(name: str, i: int, shape: tuple[int, ...]) -> np.ndarray:
        value = p(name)
        return np.zeros(shape, cfg.params_dtype) if value is None else value[i]

    return bias


def nonzero(p: Params, *names: str) -> bool:
    """Whether any of these parameters exists with a nonzero entry."""
    return any(p(n) is not None and bool(np.any(p(n) != 0)) for n in names)
