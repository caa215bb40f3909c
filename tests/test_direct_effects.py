"""The direct effects of mean and resample ablation in a sweep, against the exact decomposition with
the component's row rebuilt by hand from the replacement value."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import built
from resstream import ablation, analysis


def _loss(logits: np.ndarray, tokens) -> float:
    """Mean cross entropy of logits[:, :-1] against tokens[:, 1:]."""
    logp = jax.nn.log_softmax(jnp.asarray(logits, jnp.float32)[:, :-1], axis=-1)
    return float(-jnp.mean(jnp.take_along_axis(logp, jnp.asarray(tokens)[:, 1:, None], axis=-1)))


def _to_logits(model, cache, write: np.ndarray) -> np.ndarray:
    """The direct contribution to the logits [batch, seq, vocab] of a write [batch | 1, seq, d_model]
    in a pre-LN LayerNorm model: the final norm with its scale frozen at its value in `cache`,
    ((x - mean x) / scale * w), then W_U. The norm's bias is the `bias` row, not the write's."""
    x = np.asarray(write, np.float64)
    x = x - x.mean(-1, keepdims=True)
    x = x / np.asarray(cache["ln_final_scale"], np.float64) * np.asarray(model.ln_final.w[...], np.float64)
    return x @ np.asarray(model.unembed_matrix, np.float64)


def _replacement_writes(model, tokens, method: str, reference):
    """The reference run's writes and z ([n_layers, batch, seq, ...]); for mean ablation, their
    per-position mean over the reference batch (a batch axis of 1)."""
    _, ref_cache = model.run_with_cache(reference)
    writes = {name: np.asarray(ref_cache[name], np.float64) for name in ("attn_out", "mlp_out", "z")}
    if method == "mean":
        writes = {name: x.mean(1, keepdims=True) for name, x in writes.items()}
    return writes


@pytest.mark.parametrize("method", ["mean", "resample"])
def test_direct_effect_is_the_row_rebuilt_from_the_replacement(method):
    """direct = loss(logits - row_c + row_c(replacement)) - loss(logits), where row_c is the
    component's row of decompose_logits and row_c(r) what the replacement write r contributes through
    the frozen final norm: for sublayers and heads (z_h @ W_O[h]), mean and resample ablation."""
    model, tokens, logits, cache = built()  # pre-LN, LayerNorm
    cfg = model.cfg
    assert cfg.norm_placement == "pre" and cfg.norm == "layernorm"
    reference = jnp.roll(tokens, 1, axis=0)
    if method == "mean":  # another batch, of another size: means over it, not over `tokens`
        reference = jax.random.randint(jax.random.key(5), (3, tokens.shape[1]), 0, cfg.vocab_size)
    sublayers = [(layer, kind) for layer in range(cfg.n_layers) for kind in ("attn", "mlp")]
    heads = [(0, 1), (2, 3)]  # (layer, head)
    labels = [f"{layer}_{kind}_out" for layer, kind in sublayers] + [f"L{layer}H{head}" for layer, head in heads]
    table = ablation.ablation_sweep(model, tokens, components=labels, method=method, reference=reference)
    assert table.labels == tuple(labels)

    rows = analysis.decompose_logits(model, cache)
    head_rows = analysis.decompose_logits(model, cache, split_heads=True)
    writes = _replacement_writes(model, tokens, method, reference)
    logits = np.asarray(logits, np.float64)
    baseline = _loss(logits, tokens)
    for i, label in enumerate(labels):
        if i < len(sublayers):
            layer, kind = sublayers[i]
            own, new = rows[label], _to_logits(model, cache, writes[f"{kind}_out"][layer])
        else:
            layer, head = heads[i - len(sublayers)]
            write = writes["z"][layer][..., head, :] @ np.asarray(model.blocks.attn.W_O[layer, head], np.float64)
            own, new = head_rows[label], _to_logits(model, cache, write)
        expected = _loss(logits - np.asarray(own, np.float64) + new, tokens) - baseline
        assert abs(float(table.direct[i]) - expected) < 1e-5, (label, float(table.direct[i]), expected)
        assert abs(expected) > 1e-4, label  # the replacement did change that row
