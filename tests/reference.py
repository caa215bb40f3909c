"""An independent float64 numpy implementation of the resstream forward pass.

It shares no code with resstream: it reads the parameters as a plain nested dict and writes out the
mathematics longhand (explicit per-head loops, explicit causal mask, its own rotary tables), so
agreement with the Flax model checks the model rather than restating it.
"""

from __future__ import annotations

import math

import numpy as np


def _norm(x: np.ndarray, p: dict, kind: str, eps: float) -> np.ndarray:
    if kind == "layernorm":
        mu = x.mean(-1, keepdims=True)
        var = ((x - mu) ** 2).mean(-1, keepdims=True)
        return (x - mu) / np.sqrt(var + eps) * p["w"] + p["b"]
    return x / np.sqrt((x**2).mean(-1, keepdims=True) + eps) * p["w"]


def _rotate(x: np.ndarray, base: float) -> np.ndarray:
    """x [seq, d_head] for one head: rotate pairs (i, i + d_head/2) by angle pos * base^(-2i/d_head)."""
    seq, d_head = x.shape
    half = d_head // 2
    out = np.empty_like(x)
    for t in range(seq):
        for i in range(half):
            angle = t * base ** (-2.0 * i / d_head)
            c, s = math.cos(angle), math.sin(angle)
            a, b = x[t, i], x[t, i + half]
            out[t, i] = a * c - b * s
            out[t, i + half] = b * c + a * s
    return out


def _attention(x: np.ndarray, p: dict, cfg, dropped_heads: frozenset = frozenset()) -> np.ndarray:
    """x [seq, d_model] for one sequence; heads in `dropped_heads` contribute nothing (b_O stays)."""
    seq = x.shape[0]
    out = np.zeros_like(x)
    for h in range(cfg.n_heads):
        if h in dropped_heads:
            continue
        q = x @ p["W_Q"][h] + p["b_Q"][h]
        k = x @ p["W_K"][h] + p["b_K"][h]
        v = x @ p["W_V"][h] + p["b_V"][h]
        if cfg.positions == "rotary":
            q, k = _rotate(q, cfg.rotary_base), _rotate(k, cfg.rotary_base)
        scores = q @ k.T / math.sqrt(cfg.d_head)
        scores[np.triu_indices(seq, k=1)] = -np.inf
        weights = np.exp(scores - scores.max(-1, keepdims=True))
        weights /= weights.sum(-1, keepdims=True)
        out += (weights @ v) @ p["W_O"][h]
    return out + p["b_O"]


def _mlp(x: np.ndarray, p: dict, kind: str) -> np.ndarray:
    pre = x @ p["W_in"] + p["b_in"]
    if kind == "swiglu":
        gate = x @ p["W_gate"] + p["b_gate"]
        post = gate / (1.0 + np.exp(-gate)) * pre
    else:
        post = 0.5 * pre * (1.0 + np.tanh(math.sqrt(2.0 / math.pi) * (pre + 0.044715 * pre**3)))
    return post @ p["W_out"] + p["b_out"]


def reference_logits(
    params: dict, cfg, tokens: np.ndarray, drop: set = frozenset(), skip: set = frozenset(), heads: set = frozenset()
) -> np.ndarray:
    """params: nested dict of arrays (as `nnx.to_pure_dict` gives); tokens [batch, seq] -> logits.

    Removed by hand: `drop` {(layer, "attn" | "mlp")}: that sublayer writes zero; `skip`: that
    sublayer is left out (the stream passes it unchanged); `heads` {(layer, head)}: the head adds
    nothing to its layer's write."""
    params = _to_float64(params)
    W_U = params["W_E"].T if cfg.tied_embeddings else params["W_U"]
    layer_params = [
        {name: {k: v[layer] for k, v in sub.items()} for name, sub in params["blocks"].items()}
        for layer in range(cfg.n_layers)
    ]
    logits = []
    for seq_tokens in np.asarray(tokens):
        x = params["W_E"][seq_tokens]
        if cfg.positions == "learned":
            x = x + params["W_pos"][: len(seq_tokens)]
        for layer, p in enumerate(layer_params):
            dropped = frozenset(h for (at, h) in heads if at == layer)
            sublayers = [("attn", "ln1", lambda h, p=p, d=dropped: _attention(h, p["attn"], cfg, d))]
            if not cfg.attn_only:
                sublayers.append(("mlp", "ln2", lambda h, p=p: _mlp(h, p["mlp"], cfg.mlp)))
            for kind, norm_name, f in sublayers:
                if (layer, kind) in skip:
                    continue
                if (layer, kind) in drop:
                    f = lambda h: np.zeros_like(h)  # noqa: E731
                norm = p[norm_name]
                if cfg.norm_placement == "pre":
                    write = f(_norm(x, norm, cfg.norm, cfg.norm_eps))
                    x = x + write if cfg.residual else write
                else:
                    write = f(x)
                    x = _norm(x + write if cfg.residual else write, norm, cfg.norm, cfg.norm_eps)
        if cfg.norm_placement == "pre":
            x = _norm(x, params["ln_final"], cfg.norm, cfg.norm_eps)
        logits.append(x @ W_U + params["b_U"])
    return np.stack(logits)


def _to_float64(tree):
    if isinstance(tree, dict):
        return {k: _to_float64(v) for k, v in tree.items()}
    return np.asarray(tree, dtype=np.float64)
