"""Llama (1-3), Mistral and Qwen2 as resstream models: config.json fields -> ModelConfig fields,
HF tensors -> resstream parameters (getters), and back (export; Llama or Qwen2).

Tensors under `model.`: q_proj [n_heads * d_head, d_model], k_proj and v_proj [n_kv_heads * d_head,
d_model], o_proj [d_model, n_heads * d_head], gate_proj / up_proj [d_mlp, d_model] (W_gate / W_in),
down_proj [d_model, d_mlp] (W_out), all nn.Linear [out, in].
"""

from __future__ import annotations

from typing import Any

import numpy as np

from resstream.config import ModelConfig
from resstream.hf.common import (
    SILUS,
    Getter,
    Params,
    common_export,
    heads_in,
    heads_out,
    nonzero,
    per_head,
    per_layer,
    refuse,
    required,
    rope_export,
    rope_fields,
    tensor,
    zeros_if_none,
)


def llama_config(hf: dict, model_type: str) -> dict[str, Any]:
    """LlamaConfig, MistralConfig or Qwen2Config -> ModelConfig fields."""
    act = hf.get("hidden_act", "silu")
    if act not in SILUS:
        raise refuse("hidden_act", act, f"{model_type}'s MLP is SwiGLU: supported activations are {list(SILUS)}")
    d_model, n_heads = required(hf, "hidden_size"), required(hf, "num_attention_heads")
    if model_type == "llama":
        attention_bias, mlp_bias = hf.get("attention_bias", False), hf.get("mlp_bias", False)
        qkv_bias = out_bias = attention_bias
    else:  # Mistral has no biases; Qwen2 has them on q, k, v only (whatever config.json says)
        qkv_bias, out_bias, mlp_bias = model_type == "qwen2", False, False
    return {
        "vocab_size": required(hf, "vocab_size"),
        "n_layers": required(hf, "num_hidden_layers"),
        "d_model": d_model,
        "n_heads": n_heads,
        "n_kv_heads": hf.get("num_key_value_heads") or n_heads,
        "d_head": hf.get("head_dim") or d_model // n_heads,
        "d_mlp": required(hf, "intermediate_size"),
        "n_ctx": required(hf, "max_position_embeddings"),
        "norm": "rmsnorm",
        "positions": "rotary",
        "mlp": "swiglu",
        "qkv_bias": qkv_bias,
        "attn_out_bias": out_bias,
        "mlp_bias": mlp_bias,
        "sliding_window": _sliding_window(hf, model_type),
        "norm_eps": hf.get("rms_norm_eps", 1e-6),
        "tied_embeddings": hf.get("tie_word_embeddings", False),
        **rope_fields(hf, neox=False),
    }


def _sliding_window(hf: dict, model_type: str) -> int | None:
    """The attention window of every layer (None: unbounded), as Mistral and Qwen2 compute it."""
    if model_type == "mistral":
        return hf.get("sliding_window", 4096)  # MistralConfig's default when the key is absent
    if model_type != "qwen2" or not hf.get("use_sliding_window", False):
        return None
    window = hf.get("sliding_window", 4096)
    if window is None:
        return None
    # Qwen2Config's rule when layer_types is not given: the layers from max_window_layers on slide
    kinds = hf.get("layer_types") or [
        "sliding_attention" if i >= hf.get("max_window_layers", 28) else "full_attention"
        for i in range(required(hf, "num_hidden_layers"))
    ]
    if len(set(kinds)) > 1:
        field = "layer_types" if hf.get("layer_types") else "max_window_layers"
        why = "a sliding window on some layers only: resstream's window is the same in every layer"
        raise refuse(field, hf.get(field), why)
    return window if kinds and kinds[0] == "sliding_attention" else None


def llama_getters(cfg: ModelConfig) -> dict[str, Getter]:
    """Each resstream parameter from Llama / Mistral / Qwen2 tensors."""
    e = cfg.d_head
    a, m = "layers.{}.self_attn.", "layers.{}.mlp."
    getters = {
        "W_E": tensor("embed_tokens.weight"),
        "blocks.ln1.w": per_layer("layers.{}.input_layernorm.weight"),
        "blocks.ln2.w": per_layer("layers.{}.post_attention_layernorm.weight"),
        "blocks.attn.W_O": per_layer(a + "o_proj.weight", heads_out(e)),
        "blocks.attn.b_O": per_layer(a + "o_proj.bias"),
        "ln_final.w": tensor("norm.weight"),
        "W_U": tensor("lm_head.weight", np.transpose),
    }
    for x, proj in (("Q", "q_proj"), ("K", "k_proj"), ("V", "v_proj")):
        getters[f"blocks.attn.W_{x}"] = per_layer(a + proj + ".weight", heads_in(e))
        getters[f"blocks.attn.b_{x}"] = per_layer(a + proj + ".bias", per_head(e))
    for ours, proj in (("gate", "gate_proj"), ("in", "up_proj"), ("out", "down_proj")):
        getters[f"blocks.mlp.W_{ours}"] = per_layer(m + proj + ".weight", np.transpose)
        getters[f"blocks.mlp.b_{ours}"] = per_layer(m + proj + ".bias")
    return getters


def llama_export(cfg: ModelConfig, p: Params, model_type: str) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """(config.json, tensors) of Llama or Qwen2 (Qwen2: q/k/v biases, nothing else)."""
    H, K, D, e, F = cfg.n_heads, cfg.n_kv_heads, cfg.d_model, cfg.d_head, cfg.d_mlp
    qwen2 = model_type == "qwen2"
    attention_bias = qwen2 or nonzero(p, *(f"blocks.attn.b_{x}" for x in "QKVO"))
    mlp_bias = nonzero(p, "blocks.mlp.b_gate", "blocks.mlp.b_in", "blocks.mlp.b_out")
    config = common_export(cfg, model_type, "Qwen2ForCausalLM" if qwen2 else "LlamaForCausalLM") | {
        "num_hidden_layers": cfg.n_layers,
        "hidden_size": D,
        "num_attention_heads": H,
        "num_key_value_heads": K,
        "head_dim": e,
        "intermediate_size": cfg.d_mlp,
        "max_position_embeddings": cfg.n_ctx,
        "hidden_act": "silu",
        "rms_norm_eps": cfg.norm_eps,
        "rope_theta": cfg.rotary_base,
        "rope_scaling": rope_export(cfg),
    }
    config |= {"use_sliding_window": False} if qwen2 else {"attention_bias": attention_bias, "mlp_bias": mlp_bias}
    bias = zeros_if_none(p, cfg)
    t = {"model.embed_tokens.weight": p("W_E")}
    for i in range(cfg.n_layers):
        h = f"model.layers.{i}."
        t[h + "input_layernorm.weight"] = p("blocks.ln1.w")[i]
        t[h + "post_attention_layernorm.weight"] = p("blocks.ln2.w")[i]
        for x, proj, n in (("Q", "q_proj", H), ("K", "k_proj", K), ("V", "v_proj", K)):
            t[f"{h}self_attn.{proj}.weight"] = p(f"blocks.attn.W_{x}")[i].transpose(0, 2, 1).reshape(n * e, D)
            if attention_bias:
                t[f"{h}self_attn.{proj}.bias"] = bias(f"blocks.attn.b_{x}", i, (n, e)).reshape(-1)
        t[h + "self_attn.o_proj.weight"] = p("blocks.attn.W_O")[i].reshape(H * e, D).T
        if attention_bias and not qwen2:
            t[h + "self_attn.o_proj.bias"] = bias("blocks.attn.b_O", i, (D,))
        for ours, proj, size in (("gate", "gate_proj", F), ("in", "up_proj", F), ("out", "down_proj", D)):
            t[f"{h}mlp.{proj}.weight"] = p(f"blocks.mlp.W_{ours}")[i].T
            if mlp_bias:
                t[f"{h}mlp.{proj}.bias"] = bias(f"blocks.mlp.b_{ours}", i, (size,))
    t["model.norm.weight"] = p("ln_final.w")
    if not cfg.tied_embeddings:
        t["lm_head.weight"] = p("W_U").T
    return config, t
