"""GPT-2 and GPT-NeoX (Pythia) as resstream models: config.json fields -> ModelConfig fields, HF
tensors -> resstream parameters (getters), and back (export).

GPT-2 (tensors under `transformer.`): Conv1D weights are [in, out], so W_in and W_out map directly;
c_attn is [d_model, 3 * d_model], q, k, v side by side, each head-major [n_heads, d_head].
GPT-NeoX (`gpt_neox.`): nn.Linear weights are [out, in]; query_key_value's output axis is laid out per
head as [n_heads, 3 (q, k, v), d_head]; the unembedding is `embed_out`.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from resstream.config import ModelConfig
from resstream.hf.common import (
    Getter,
    Params,
    common_export,
    gelu,
    heads_out,
    nonzero,
    per_layer,
    refuse,
    required,
    rope_export,
    rope_fields,
    tensor,
    zeros_if_none,
)


# ------------------------------------------------------------------------------------------- GPT-2
def gpt2_config(hf: dict) -> dict[str, Any]:
    """GPT2Config -> ModelConfig fields."""
    for field, supported in (
        ("scale_attn_weights", True),
        ("scale_attn_by_inverse_layer_idx", False),
        ("add_cross_attention", False),
    ):
        if hf.get(field, supported) != supported:
            raise refuse(field, hf[field], f"resstream computes GPT-2 with {field}={supported}")
    d_model = required(hf, "n_embd")
    return {
        "vocab_size": required(hf, "vocab_size"),
        "n_layers": required(hf, "n_layer"),
        "d_model": d_model,
        "n_heads": required(hf, "n_head"),
        "d_mlp": hf.get("n_inner") or 4 * d_model,
        "n_ctx": required(hf, "n_positions"),
        "norm": "layernorm",
        "positions": "learned",
        "mlp": gelu(hf, "activation_function"),
        "norm_eps": hf.get("layer_norm_epsilon", 1e-5),
        "tied_embeddings": hf.get("tie_word_embeddings", True),
    }


def gpt2_getters(cfg: ModelConfig) -> dict[str, Getter]:
    """Each resstream parameter from GPT-2's tensors."""
    H, D, e = cfg.n_heads, cfg.d_model, cfg.d_head
    attn = "h.{}.attn."

    def qkv(i: int) -> Getter:  # c_attn [D, 3 * H * e] -> [H, D, e]
        return per_layer(attn + "c_attn.weight", lambda w: w.reshape(D, 3, H, e)[:, i].transpose(1, 0, 2))

    def qkv_bias(i: int) -> Getter:
        return per_layer(attn + "c_attn.bias", lambda b: b.reshape(3, H, e)[i])

    return {
        "W_E": tensor("wte.weight"),
        "W_pos": tensor("wpe.weight"),
        "blocks.ln1.w": per_layer("h.{}.ln_1.weight"),
        "blocks.ln1.b": per_layer("h.{}.ln_1.bias"),
        "blocks.attn.W_Q": qkv(0),
        "blocks.attn.W_K": qkv(1),
        "blocks.attn.W_V": qkv(2),
        "blocks.attn.b_Q": qkv_bias(0),
        "blocks.attn.b_K": qkv_bias(1),
        "blocks.attn.b_V": qkv_bias(2),
        "blocks.attn.W_O": per_layer(attn + "c_proj.weight", lambda w: w.reshape(H, e, D)),
        "blocks.attn.b_O": per_layer(attn + "c_proj.bias"),
        "blocks.ln2.w": per_layer("h.{}.ln_2.weight"),
        "blocks.ln2.b": per_layer("h.{}.ln_2.bias"),
        "blocks.mlp.W_in": per_layer("h.{}.mlp.c_fc.weight"),
        "blocks.mlp.b_in": per_layer("h.{}.mlp.c_fc.bias"),
        "blocks.mlp.W_out": per_layer("h.{}.mlp.c_proj.weight"),
        "blocks.mlp.b_out": per_layer("h.{}.mlp.c_proj.bias"),
        "ln_final.w": tensor("ln_f.weight"),
        "ln_final.b": tensor("ln_f.bias"),
        "W_U": tensor("lm_head.weight", np.transpose),
    }


def gpt2_export(cfg: ModelConfig, p: Params) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """(config.json, tensors) of GPT-2; biases resstream lacks are written as zeros."""
    H, D, e = cfg.n_heads, cfg.d_model, cfg.d_head
    config = common_export(cfg, "gpt2", "GPT2LMHeadModel") | {
        "n_layer": cfg.n_layers,
        "n_embd": D,
        "n_head": H,
        "n_inner": cfg.d_mlp,
        "n_positions": cfg.n_ctx,
        "activation_function": "gelu_new" if cfg.mlp == "gelu" else "gelu",
        "layer_norm_epsilon": cfg.norm_eps,
        "scale_attn_weights": True,
        "scale_attn_by_inverse_layer_idx": False,
        "add_cross_attention": False,
    }
    bias = zeros_if_none(p, cfg)
    t = {"transformer.wte.weight": p("W_E"), "transformer.wpe.weight": p("W_pos")}
    for i in range(cfg.n_layers):
        h = f"transformer.h.{i}."
        qkv = np.stack([p(f"blocks.attn.W_{x}")[i] for x in "QKV"])  # [3, H, D, e]
        t |= {
            h + "ln_1.weight": p("blocks.ln1.w")[i],
            h + "ln_1.bias": p("blocks.ln1.b")[i],
            h + "attn.c_attn.weight": qkv.transpose(2, 0, 1, 3).reshape(D, 3 * H * e),
            h + "attn.c_attn.bias": np.concatenate([bias(f"blocks.attn.b_{x}", i, (H, e)).reshape(-1) for x in "QKV"]),
            h + "attn.c_proj.weight": p("blocks.attn.W_O")[i].reshape(H * e, D),
            h + "attn.c_proj.bias": bias("blocks.attn.b_O", i, (D,)),
            h + "ln_2.weight": p("blocks.ln2.w")[i],
            h + "ln_2.bias": p("blocks.ln2.b")[i],
            h + "mlp.c_fc.weight": p("blocks.mlp.W_in")[i],
            h + "mlp.c_fc.bias": bias("blocks.mlp.b_in", i, (cfg.d_mlp,)),
            h + "mlp.c_proj.weight": p("blocks.mlp.W_out")[i],
            h + "mlp.c_proj.bias": bias("blocks.mlp.b_out", i, (D,)),
        }
    t |= {"transformer.ln_f.weight": p("ln_final.w"), "transformer.ln_f.bias": p("ln_final.b")}
    if not cfg.tied_embeddings:
        t["lm_head.weight"] = p("W_U").T
    return config, t


# ---------------------------------------------------------------------------------------- GPT-NeoX
def neox_config(hf: dict) -> dict[str, Any]:
    """GPTNeoXConfig -> ModelConfig fields."""
    d_model, n_heads = required(hf, "hidden_size"), required(hf, "num_attention_heads")
    if hf.get("head_dim") not in (None, d_model // n_heads):
        why = f"GPT-NeoX heads are hidden_size / num_attention_heads = {d_model // n_heads}"
        raise refuse("head_dim", hf["head_dim"], why)
    bias = hf.get("attention_bias", True)
    return {
        "vocab_size": required(hf, "vocab_size"),
        "n_layers": required(hf, "num_hidden_layers"),
        "d_model": d_model,
        "n_heads": n_heads,
        "d_mlp": required(hf, "intermediate_size"),
        "n_ctx": required(hf, "max_position_embeddings"),
        "norm": "layernorm",
        "positions": "rotary",
        "mlp": gelu(hf, "hidden_act"),
        "parallel_attn": hf.get("use_parallel_residual", True),
        "qkv_bias": bias,
        "attn_out_bias": bias,
        "norm_eps": hf.get("layer_norm_eps", 1e-5),
        "tied_embeddings": hf.get("tie_word_embeddings", False),
        **rope_fields(hf, neox=True),
    }


def neox_getters(cfg: ModelConfig) -> dict[str, Getter]:
    """Each resstream parameter from GPT-NeoX's tensors."""
    H, D, e = cfg.n_heads, cfg.d_model, cfg.d_head
    a, m = "layers.{}.attention.", "layers.{}.mlp."

    def qkv(i: int) -> Getter:  # [H * 3 * e, D] -> [H, D, e]
        return per_layer(a + "query_key_value.weight", lambda w: w.reshape(H, 3, e, D)[:, i].transpose(0, 2, 1))

    def qkv_bias(i: int) -> Getter:
        return per_layer(a + "query_key_value.bias", lambda b: b.reshape(H, 3, e)[:, i])

    return {
        "W_E": tensor("embed_in.weight"),
        "blocks.ln1.w": per_layer("layers.{}.input_layernorm.weight"),
        "blocks.ln1.b": per_layer("layers.{}.input_layernorm.bias"),
        "blocks.attn.W_Q": qkv(0),
        "blocks.attn.W_K": qkv(1),
        "blocks.attn.W_V": qkv(2),
        "blocks.attn.b_Q": qkv_bias(0),
        "blocks.attn.b_K": qkv_bias(1),
        "blocks.attn.b_V": qkv_bias(2),
        "blocks.attn.W_O": per_layer(a + "dense.weight", heads_out(e)),
        "blocks.attn.b_O": per_layer(a + "dense.bias"),
        "blocks.ln2.w": per_layer("layers.{}.post_attention_layernorm.weight"),
        "blocks.ln2.b": per_layer("layers.{}.post_attention_layernorm.bias"),
        "blocks.mlp.W_in": per_layer(m + "dense_h_to_4h.weight", np.transpose),
        "blocks.mlp.b_in": per_layer(m + "dense_h_to_4h.bias"),
        "blocks.mlp.W_out": per_layer(m + "dense_4h_to_h.weight", np.transpose),
        "blocks.mlp.b_out": per_layer(m + "dense_4h_to_h.bias"),
        "ln_final.w": tensor("final_layer_norm.weight"),
        "ln_final.b": tensor("final_layer_norm.bias"),
        "W_U": tensor("embed_out.weight", np.transpose),
    }


def neox_export(cfg: ModelConfig, p: Params) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """(config.json, tensors) of GPT-NeoX; its attention biases only where the model's are nonzero."""
    H, D, e = cfg.n_heads, cfg.d_model, cfg.d_head
    attention_bias = nonzero(p, "blocks.attn.b_Q", "blocks.attn.b_K", "blocks.attn.b_V", "blocks.attn.b_O")
    config = common_export(cfg, "gpt_neox", "GPTNeoXForCausalLM") | {
        "num_hidden_layers": cfg.n_layers,
        "hidden_size": D,
        "num_attention_heads": H,
        "intermediate_size": cfg.d_mlp,
        "max_position_embeddings": cfg.n_ctx,
        "hidden_act": "gelu" if cfg.mlp == "gelu_exact" else "gelu_new",
        "layer_norm_eps": cfg.norm_eps,
        "use_parallel_residual": cfg.parallel_attn,
        "attention_bias": attention_bias,
        # GPT-NeoX's own names: transformers 5 takes rotary_emb_base, not rope_theta, for this family
        "rotary_emb_base": cfg.rotary_base,
        "rotary_pct": _rotary_pct(cfg.rotary_dims, e),
        "rope_scaling": rope_export(cfg),
    }
    bias = zeros_if_none(p, cfg)
    g = "gpt_neox."
    t = {g + "embed_in.weight": p("W_E")}
    for i in range(cfg.n_layers):
        h = f"{g}layers.{i}."
        qkv = np.stack([p(f"blocks.attn.W_{x}")[i].transpose(0, 2, 1) for x in "QKV"], axis=1)  # [H, 3, e, D]
        t |= {
            h + "input_layernorm.weight": p("blocks.ln1.w")[i],
            h + "input_layernorm.bias": p("blocks.ln1.b")[i],
            h + "attention.query_key_value.weight": qkv.reshape(3 * H * e, D),
            h + "attention.dense.weight": p("blocks.attn.W_O")[i].reshape(H * e, D).T,
            h + "post_attention_layernorm.weight": p("blocks.ln2.w")[i],
            h + "post_attention_layernorm.bias": p("blocks.ln2.b")[i],
            h + "mlp.dense_h_to_4h.weight": p("blocks.mlp.W_in")[i].T,
            h + "mlp.dense_h_to_4h.bias": bias("blocks.mlp.b_in", i, (cfg.d_mlp,)),
            h + "mlp.dense_4h_to_h.weight": p("blocks.mlp.W_out")[i].T,
            h + "mlp.dense_4h_to_h.bias": bias("blocks.mlp.b_out", i, (D,)),
        }
        if attention_bias:
            qkv_b = np.stack([bias(f"blocks.attn.b_{x}", i, (H, e)) for x in "QKV"], axis=1)  # [H, 3, e]
            t[h + "attention.query_key_value.bias"] = qkv_b.reshape(-1)
            t[h + "attention.dense.bias"] = bias("blocks.attn.b_O", i, (D,))
    t |= {g + "final_layer_norm.weight": p("ln_final.w"), g + "final_layer_norm.bias": p("ln_final.b")}
    if not cfg.tied_embeddings:
        t["embed_out.weight"] = p("W_U").T
    return config, t


def _rotary_pct(rotary_dim: int, d_head: int) -> float:
    """The fraction f with int(d_head * f) == rotary_dim, as GPT-NeoX computes its rotary dimensions:
    rotary_dim / d_head, or the next float up where rounding would floor it one short (44 * (30 / 44) < 30)."""
    fraction = rotary_dim / d_head
    return fraction if int(d_head * fraction) == rotary_dim else math.nextafter(fraction, 2.0)
