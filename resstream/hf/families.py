"""The Hugging Face model families that `resstream.hf` reads and writes, and the choice of family
for a resstream model. Each family's tables (config fields, tensor layouts) live in `gpt`
(GPT-2, GPT-NeoX) and `llama` (Llama, Mistral, Qwen2). None of these families has an
unembedding bias (b_U).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from resstream.config import ModelConfig
from resstream.hf.common import Getter, HFError, Params, nonzero, refuse
from resstream.hf.gpt import gpt2_config, gpt2_export, gpt2_getters, neox_config, neox_export, neox_getters
from resstream.hf.llama import llama_config, llama_export, llama_getters


@dataclass(frozen=True)
class Family:
    """How one Hugging Face model type maps onto resstream."""

    model_type: str
    architecture: str  # the causal-LM class named in config.json "architectures"
    prefix: str  # the base model's name, before its tensors' names (absent in some hub checkpoints)
    config: Callable[[dict], dict[str, Any]]
    getters: Callable[[ModelConfig], dict[str, Getter]]


FAMILIES = {
    f.model_type: f
    for f in (
        Family("gpt2", "GPT2LMHeadModel", "transformer.", gpt2_config, gpt2_getters),
        Family("gpt_neox", "GPTNeoXForCausalLM", "gpt_neox.", neox_config, neox_getters),
        Family("llama", "LlamaForCausalLM", "model.", lambda hf: llama_config(hf, "llama"), llama_getters),
        Family("mistral", "MistralForCausalLM", "model.", lambda hf: llama_config(hf, "mistral"), llama_getters),
        Family("qwen2", "Qwen2ForCausalLM", "model.", lambda hf: llama_config(hf, "qwen2"), llama_getters),
    )
}


def family_of(hf: dict) -> Family:
    """The family of a config.json (its model_type and architectures); HFError for any other."""
    model_type = hf.get("model_type")
    if model_type not in FAMILIES:
        raise refuse("model_type", model_type, f"resstream reads {sorted(FAMILIES)}")
    family = FAMILIES[model_type]
    architectures = hf.get("architectures") or [family.architecture]
    if architectures != [family.architecture]:
        raise refuse("architectures", architectures, f"resstream reads the causal LM {family.architecture!r}")
    return family


def export(cfg: ModelConfig, p: Params) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """(config.json, tensors) of the family that computes this model exactly; HFError naming the
    field where none does."""

    def no(field: str, why: str) -> HFError:
        return HFError(f"cannot export a model with {field}={getattr(cfg, field)!r} to Hugging Face: {why}")

    for field, supported in (("norm_placement", "pre"), ("residual", True), ("deepnorm", False), ("attn_only", False)):
        if getattr(cfg, field) != supported:
            raise no(field, f"GPT-2, GPT-NeoX and Llama all compute {field}={supported!r}")
    if cfg.sliding_window is not None:
        raise no("sliding_window", "export of windowed attention (Mistral) is not implemented")
    if nonzero(p, "b_U"):
        raise no(
            "unembed_bias",
            "its b_U is nonzero and no target family has an unembedding bias; train with model.unembed_bias=False",
        )
    if cfg.positions == "learned":
        if cfg.norm != "layernorm":
            raise no("norm", "learned positions export as GPT-2, which uses norm='layernorm'")
        if cfg.mlp not in ("gelu", "gelu_exact"):
            raise no("mlp", "learned positions export as GPT-2, whose MLP is GELU")
        _check_mha(cfg, no, "GPT-2")
        return gpt2_export(cfg, p)
    if cfg.norm == "layernorm":
        if cfg.mlp not in ("gelu", "gelu_exact"):
            raise no("mlp", "rotary LayerNorm models export as GPT-NeoX, whose MLP is GELU")
        _check_mha(cfg, no, "GPT-NeoX")
        return neox_export(cfg, p)
    if cfg.mlp != "swiglu":
        raise no("mlp", "rotary RMSNorm models export as Llama, whose MLP is SwiGLU")
    if cfg.parallel_attn:
        raise no("parallel_attn", "Llama's blocks are sequential")
    if cfg.rotary_dim is not None and cfg.rotary_dim != cfg.d_head:
        raise no("rotary_dim", "Llama rotates all of each head's dimensions")
    qkv = nonzero(p, "blocks.attn.b_Q", "blocks.attn.b_K", "blocks.attn.b_V")
    rest = nonzero(p, "blocks.attn.b_O", "blocks.mlp.b_gate", "blocks.mlp.b_in", "blocks.mlp.b_out")
    return llama_export(cfg, p, "qwen2" if qkv and not rest else "llama")


def _check_mha(cfg: ModelConfig, no: Callable[[str, str], HFError], family: str) -> None:
    if cfg.n_kv_heads != cfg.n_heads:
        raise no("n_kv_heads", f"{family} has one key/value head per query head (n_heads={cfg.n_heads})")
    if cfg.n_heads * cfg.d_head != cfg.d_model:
        raise no("d_head", f"{family} needs n_heads * d_head = d_model ({cfg.n_heads} * {cfg.d_head} != {cfg.d_model})")
    if cfg.parallel_attn and family == "GPT-2":
        raise no("parallel_attn", "GPT-2's blocks are sequential; rotary LayerNorm models export as GPT-NeoX")
