"""The recorded attention pattern against the recorded z: the pattern is computed beside
`jax.nn.dot_product_attention` (for the record only), so it must be the weights that attention used."""

import jax.numpy as jnp
import numpy as np
import pytest

from conftest import built


def _stream_read_by_attention(model, cache, layer: int) -> jnp.ndarray:
    """What layer `layer`'s attention reads [batch, seq, d_model], rebuilt from the recorded stream:
    pre-LN, ln1 of resid_pre with the recorded scale; post-LN, resid_pre itself."""
    x = cache["resid_pre"][layer].astype(jnp.float32)
    if model.cfg.norm_placement == "post":
        return x
    ln1 = model.blocks.ln1
    if model.cfg.norm == "layernorm":
        x = x - x.mean(-1, keepdims=True)
    x = x / cache["ln1_scale"][layer] * ln1.w[layer]
    return x if ln1.b is None else x + ln1.b[layer]


@pytest.mark.parametrize("placement", ["pre", "post"])
@pytest.mark.parametrize("positions", ["learned", "rotary"])
def test_pattern_times_v_is_z(positions, placement):
    """pattern [n_layers, batch, n_heads, q, k] applied to v (from the stream attention reads, W_V
    and b_V) gives the recorded z at every layer; every row sums to 1 and no query sees a later key."""
    model, tokens, _, _ = built(positions=positions, norm_placement=placement)
    _, cache = model.run_with_cache(tokens, record=("pattern", "resid_pre"))
    cfg, (batch, seq) = model.cfg, tokens.shape
    pattern = np.asarray(cache["pattern"], np.float64)
    assert pattern.shape == (cfg.n_layers, batch, cfg.n_heads, seq, seq)
    np.testing.assert_allclose(pattern.sum(-1), 1.0, atol=1e-6)
    assert np.all(pattern[..., ~np.tril(np.ones((seq, seq), bool))] == 0)  # causal, exactly
    assert np.all(pattern[..., np.tril(np.ones((seq, seq), bool))] > 0)
    for layer in range(cfg.n_layers):
        h = np.asarray(_stream_read_by_attention(model, cache, layer), np.float64)
        W_V = np.asarray(model.blocks.attn.W_V[layer], np.float64)  # [n_heads, d_model, d_head]
        b_V = np.asarray(model.blocks.attn.b_V[layer], np.float64)  # [n_heads, d_head]
        v = np.einsum("bkd,hde->bkhe", h, W_V) + b_V
        z = np.einsum("bhqk,bkhe->bqhe", pattern[layer], v)
        recorded = np.asarray(cache["z"][layer], np.float64)
        np.testing.assert_allclose(z, recorded, rtol=0, atol=1e-5 * np.abs(recorded).max(), err_msg=f"layer {layer}")
