"""An independent float64 numpy implementation of the resstream forward pass.

It shares no code with resstream: it reads the parameters as a plain nested dict and writes out the
mathematics longhand (explicit per-head loops, explicit causal and sliding-window masks, its own
rotary tables and frequency scalings), so agreement with the Flax model checks the model rather than
restating it. Every option is written from its mathematical definition:

- grouped-query attention: query head h reads key/value head h // (n_heads // n_kv_heads);
- parallel blocks (GPT-NeoX): x + attn(ln1(x)) + mlp(ln2(x)), both sublayers reading x;
- rotary positions on the first rotary_dim dimensions of each head, pairs (i, i + rotary_dim / 2),
  angle pos * inv_freq[i], inv_freq[i] = base^(-2i / rotary_dim), with "linear" or "llama3" scaling;
- "gelu" (tanh approximation), "gelu_exact" (erf) or "swiglu" MLPs;
- absent biases (qkv_bias, attn_out_bias, mlp_bias, unembed_bias False) contribute nothing;
- a sliding window W: the query at q attends to the keys k with q - W < k <= q.
"""

from __future__ import annotations

import math

import numpy as np

_erf = np.vectorize(math.erf, otypes=[np.float64])


def _norm(x: np.ndarray, p: dict, kind: str, eps: float) -> np.ndarray:
    if kind == "layernorm":
        mu = x.mean(-1, keepdims=True)
        var = ((x - mu) ** 2).mean(-1, keepdims=True)
        return (x - mu) / np.sqrt(var + eps) * p["w"] + p["b"]
    return x / np.sqrt((x**2).mean(-1, keepdims=True) + eps) * p["w"]


def _bias(p: dict, name: str, shape: tuple[int, ...]) -> np.ndarray:
    """The bias `name` of `p`, or zeros where the model has none (absent from the dict, or None)."""
    value = p.get(name)
    return np.zeros(shape) if value is None else value


def rotary_dims(cfg) -> int:
    """The dimensions of each head that rotary positions rotate: rotary_dim, or all of d_head."""
    return cfg.d_head if getattr(cfg, "rotary_dim", None) is None else cfg.rotary_dim


def inv_freq(cfg) -> list[float]:
    """The rotary frequency of each pair (i, i + rotary_dim / 2), after the config's scaling."""
    dims = rotary_dims(cfg)
    freqs = [cfg.rotary_base ** (-2.0 * i / dims) for i in range(dims // 2)]
    scaling = getattr(cfg, "rope_scaling", "none")
    if scaling == "none":
        return freqs
    if scaling == "linear":
        return [f / cfg.rope_factor for f in freqs]
    assert scaling == "llama3", scaling
    return [llama3_frequency(f, cfg)[0] for f in freqs]


def llama3_frequency(freq: float, cfg) -> tuple[float, str]:
    """(scaled frequency, branch) for Llama 3.1's scaling: "high" frequencies (wavelength below
    original_n_ctx / high_freq_factor) are kept, "low" ones (wavelength above original_n_ctx /
    low_freq_factor) are divided by the factor, and the "medium" ones between blend the two."""
    factor, n_ctx = cfg.rope_factor, cfg.rope_original_n_ctx
    low, high = cfg.rope_low_freq_factor, cfg.rope_high_freq_factor
    wavelen = 2.0 * math.pi / freq
    if wavelen < n_ctx / high:
        return freq, "high"
    if wavelen > n_ctx / low:
        return freq / factor, "low"
    smooth = (n_ctx / wavelen - low) / (high - low)
    return (1.0 - smooth) * freq / factor + smooth * freq, "medium"


def _rotate(x: np.ndarray, cfg) -> np.ndarray:
    """x [seq, d_head] for one head: rotate pairs (i, i + rotary_dim/2) by angle pos * inv_freq[i];
    the dimensions from rotary_dim on pass through unchanged."""
    seq = x.shape[0]
    freqs = inv_freq(cfg)
    half = len(freqs)
    out = x.copy()
    for t in range(seq):
        for i, freq in enumerate(freqs):
            angle = t * freq
            c, s = math.cos(angle), math.sin(angle)
            a, b = x[t, i], x[t, i + half]
            out[t, i] = a * c - b * s
            out[t, i + half] = b * c + a * s
    return out


def _allowed(q: int, k: int, window: int | None) -> bool:
    """Whether the query at position q may attend to the key at position k."""
    return k <= q and (window is None or k > q - window)


def _attention(x: np.ndarray, p: dict, cfg, dropped_heads: frozenset = frozenset()) -> np.ndarray:
    """x [seq, d_model] for one sequence; heads in `dropped_heads` contribute nothing (b_O stays)."""
    seq, d_model = x.shape
    n_kv_heads = getattr(cfg, "n_kv_heads", None) or cfg.n_heads
    group = cfg.n_heads // n_kv_heads
    window = getattr(cfg, "sliding_window", None)
    out = np.zeros_like(x)
    for h in range(cfg.n_heads):
        if h in dropped_heads:
            continue
        kv = h // group
        q = x @ p["W_Q"][h] + _bias(p, "b_Q", (cfg.n_heads, cfg.d_head))[h]
        k = x @ p["W_K"][kv] + _bias(p, "b_K", (n_kv_heads, cfg.d_head))[kv]
        v = x @ p["W_V"][kv] + _bias(p, "b_V", (n_kv_heads, cfg.d_head))[kv]
        if cfg.positions == "rotary":
            q, k = _rotate(q, cfg), _rotate(k, cfg)
        scores = q @ k.T / math.sqrt(cfg.d_head)
        for i in range(seq):
            for j in range(seq):
                if not _allowed(i, j, window):
                    scores[i, j] = -np.inf
        weights = np.exp(scores - scores.max(-1, keepdims=True))
        weights /= weights.sum(-1, keepdims=True)
        out += (weights @ v) @ p["W_O"][h]
    return out + _bias(p, "b_O", (d_model,))


def _gelu(x: np.ndarray, kind: str) -> np.ndarray:
    if kind == "gelu_exact":
        return 0.5 * x * (1.0 + _erf(x / math.sqrt(2.0)))
    return 0.5 * x * (1.0 + np.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x**3)))


def _mlp(x: np.ndarray, p: dict, kind: str) -> np.ndarray:
    d_mlp, d_model = p["W_in"].shape[-1], x.shape[-1]
    pre = x @ p["W_in"] + _bias(p, "b_in", (d_mlp,))
    if kind == "swiglu":
        gate = x @ p["W_gate"] + _bias(p, "b_gate", (d_mlp,))
        post = gate / (1.0 + np.exp(-gate)) * pre
    else:
        post = _gelu(pre, kind)
    return post @ p["W_out"] + _bias(p, "b_out", (d_model,))


def reference_logits(
    params: dict, cfg, tokens: np.ndarray, drop: set = frozenset(), skip: set = frozenset(), heads: set = frozenset()
) -> np.ndarray:
    """params: nested dict of arrays (as `nnx.to_pure_dict` gives); tokens [batch, seq] -> logits.

    Removed by hand: `drop` {(layer, "attn" | "mlp")}: that sublayer writes zero; `skip`: that
    sublayer is left out (the stream passes it unchanged); `heads` {(layer, head)}: the head adds
    nothing to its layer's write. In a parallel block a removed sublayer adds nothing and the other
    still reads the layer's input."""
    return reference_run(params, cfg, tokens, drop=drop, skip=skip, heads=heads)[0]


def reference_run(
    params: dict, cfg, tokens: np.ndarray, drop: set = frozenset(), skip: set = frozenset(), heads: set = frozenset()
) -> tuple[np.ndarray, np.ndarray]:
    """(logits [batch, seq, vocab], streams [n_layers + 1, batch, seq, d_model]): `reference_logits`
    and the residual stream entering each layer, then the stream entering the final norm."""
    params = _to_float64(params)
    W_U = params["W_E"].T if cfg.tied_embeddings else params["W_U"]
    layer_params = [
        {name: {k: v[layer] for k, v in sub.items() if v is not None} for name, sub in params["blocks"].items()}
        for layer in range(cfg.n_layers)
    ]
    logits, streams = [], []
    for seq_tokens in np.asarray(tokens):
        x = params["W_E"][seq_tokens]
        if cfg.positions == "learned":
            x = x + params["W_pos"][: len(seq_tokens)]
        seen = []
        for layer, p in enumerate(layer_params):
            seen.append(x)
            dropped = frozenset(h for (at, h) in heads if at == layer)
            sublayers = [("attn", "ln1", lambda h, p=p, d=dropped: _attention(h, p["attn"], cfg, d))]
            if not cfg.attn_only:
                sublayers.append(("mlp", "ln2", lambda h, p=p: _mlp(h, p["mlp"], cfg.mlp)))
            if getattr(cfg, "parallel_attn", False):
                assert cfg.norm_placement == "pre" and cfg.residual, "parallel blocks are pre-LN residual"
                x = x + sum(
                    (
                        f(_norm(x, p[norm_name], cfg.norm, cfg.norm_eps))
                        for kind, norm_name, f in sublayers
                        if (layer, kind) not in skip | set(drop)
                    ),
                    np.zeros_like(x),
                )
                continue
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
        streams.append(np.stack([*seen, x]))
        if cfg.norm_placement == "pre":
            x = _norm(x, params["ln_final"], cfg.norm, cfg.norm_eps)
        logits.append(x @ W_U + _bias(params, "b_U", (W_U.shape[1],)))
    return np.stack(logits), np.stack(streams, axis=1)


def _to_float64(tree):
    if isinstance(tree, dict):
        return {k: _to_float64(v) for k, v in tree.items()}
    return None if tree is None else np.asarray(tree, dtype=np.float64)
