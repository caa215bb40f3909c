"""The architecture options that Hugging Face checkpoints bring (grouped-query attention, parallel
blocks, partial rotary, rotary scaling, erf GELU, optional biases, sliding windows), checked against
tests/reference.py and against the plain model each one reduces to at its neutral value.

The grid tests (tests/test_model.py, tests/test_analysis.py, tests/test_ablation.py) already compare
every `FAMILIES` model with the reference; the tests here show that those comparisons can fail (the
reference moves when an option is dropped) and check what the grid does not."""

import dataclasses

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from conftest import FAMILIES, SEQ, TINY, built, max_rel_err, randomize, reference_inputs
from reference import inv_freq, llama3_frequency, reference_logits, reference_run
from resstream import ConfigError, ModelConfig, Transformer, analysis, interventions
from resstream import ablation as A  # noqa: N812


def _family(name: str):
    """(model, tokens, logits, cache) for a randomised TINY model of the family `name`."""
    return built(**FAMILIES[name])


def _with_config(model: Transformer, params: dict | None = None, **changes) -> Transformer:
    """A model of `model.cfg` with `changes`, holding `params` (default: `model`'s own parameters)."""
    other = Transformer(dataclasses.replace(model.cfg, **changes), rngs=nnx.Rngs(0))
    state = nnx.state(other, nnx.Param)
    nnx.replace_by_pure_dict(state, params if params is not None else nnx.to_pure_dict(nnx.state(model, nnx.Param)))
    nnx.update(other, state)
    return other


def _param_names(tree: dict, prefix: str = "") -> set[str]:
    """Dotted names of the parameters in a pure dict (a None leaf is no parameter)."""
    names = set()
    for key, value in tree.items():
        if isinstance(value, dict):
            names |= _param_names(value, f"{prefix}{key}.")
        elif value is not None:
            names.add(f"{prefix}{key}")
    return names


# ------------------------------------------------------------------------------ the grid can fail
@pytest.mark.parametrize(
    ("family", "dropped"),
    [
        ("neox", dict(parallel_attn=False)),
        ("neox", dict(rotary_dim=None)),
        ("neox", dict(mlp="gelu")),
        ("gptj_linear", dict(rope_scaling="none")),
        ("llama3", dict(rope_scaling="none")),
        ("llama3", dict(rope_scaling="linear")),  # llama3 keeps the high frequencies that linear divides
        ("mistral", dict(sliding_window=None)),
    ],
    ids=lambda x: x if isinstance(x, str) else "-".join(f"{k}={v}" for k, v in x.items()),
)
def test_each_option_of_a_family_moves_the_reference_away_from_the_model(family, dropped):
    """The model equals the reference with the option (the grid test) and not without it: so the grid
    test fails if the model ignored the option or if the reference did."""
    model, tokens, logits, _ = _family(family)
    params, cfg = reference_inputs(model)
    assert max_rel_err(logits, reference_logits(params, cfg, np.asarray(tokens))) < 1e-5
    without = reference_logits(params, dataclasses.replace(cfg, **dropped), np.asarray(tokens))
    assert max_rel_err(logits, without) > 1e-4


def test_the_llama3_family_takes_every_branch_of_the_scaling():
    cfg = _family("llama3")[0].cfg
    dims = cfg.d_head if cfg.rotary_dim is None else cfg.rotary_dim
    freqs = [cfg.rotary_base ** (-2.0 * i / dims) for i in range(dims // 2)]
    branches = [llama3_frequency(f, cfg)[1] for f in freqs]
    assert set(branches) == {"high", "medium", "low"}, branches
    scaled = inv_freq(cfg)
    assert scaled[0] == freqs[0] and scaled[-1] == freqs[-1] / cfg.rope_factor
    medium = branches.index("medium")
    assert freqs[medium] / cfg.rope_factor < scaled[medium] < freqs[medium]


def test_partial_rotary_with_an_odd_head_dimension_matches_the_reference():
    """rotary_dim even makes an odd d_head valid: the last dimensions pass through unrotated."""
    cfg = ModelConfig(**TINY, d_head=9, positions="rotary", rotary_dim=4)  # TINY's other shapes: little to compile
    model = randomize(Transformer(cfg, rngs=nnx.Rngs(0)))
    tokens = np.asarray(_family("neox")[1])
    expected = reference_logits(*reference_inputs(model), tokens)
    assert max_rel_err(model(jnp.asarray(tokens)), expected) < 1e-5


# ------------------------------------------------------------------------------ neutral values
def test_grouped_query_attention_is_multi_head_attention_with_shared_keys_and_values():
    """Query head h reads key/value head h // (n_heads / n_kv_heads): repeating each key/value head
    for its group of query heads gives a multi-head model with the same logits."""
    model, tokens, logits, _ = _family("qwen2")  # one key/value head, with biases
    gqa, _, gqa_logits, _ = _family("mistral")  # two key/value heads, each serving two query heads
    for grouped, grouped_logits in ((model, logits), (gqa, gqa_logits)):
        cfg = grouped.cfg
        params = nnx.to_pure_dict(nnx.state(grouped, nnx.Param))
        attn = dict(params["blocks"]["attn"])
        for name in ("W_K", "W_V", "b_K", "b_V"):
            if attn.get(name) is not None:
                attn[name] = np.repeat(np.asarray(attn[name]), cfg.n_heads // cfg.n_kv_heads, axis=1)
        mha = _with_config(grouped, {**params, "blocks": {**params["blocks"], "attn": attn}}, n_kv_heads=cfg.n_heads)
        assert max_rel_err(mha(tokens), grouped_logits) <= 1e-6, cfg.n_kv_heads
    assert ModelConfig(**TINY, n_kv_heads=TINY["n_heads"]) == ModelConfig(**TINY)


@pytest.mark.parametrize(
    "neutral",
    [
        dict(rotary_dim=8),  # all of TINY's d_head
        dict(rope_scaling="linear", rope_factor=1.0),
        dict(rope_scaling="llama3", rope_factor=1.0),  # every branch divides by 1
        dict(sliding_window=SEQ),  # the first key is still in the last query's window
    ],
    ids=lambda kw: "-".join(f"{k}={v}" for k, v in kw.items()),
)
def test_an_option_at_its_neutral_value_changes_nothing(neutral):
    model, tokens, logits, _ = _family("llama")
    assert max_rel_err(_with_config(model, **neutral)(tokens), logits) <= 1e-6


def test_a_sliding_window_masks_the_attention_pattern():
    model, tokens, _, _ = _family("mistral")
    _, cache = model.run_with_cache(tokens, record=("pattern",))
    pattern = np.asarray(cache["pattern"])  # [n_layers, batch, n_heads, q, k]
    q, k = np.indices((SEQ, SEQ))
    inside = (k <= q) & (k > q - model.cfg.sliding_window)
    assert np.all(pattern[..., ~inside] == 0)
    assert np.all(pattern[..., inside] > 0)
    np.testing.assert_allclose(pattern.sum(-1), 1.0, rtol=1e-5)


# ------------------------------------------------------------------------------ biases
_BIASES = {
    "qkv_bias": {"blocks.attn.b_Q", "blocks.attn.b_K", "blocks.attn.b_V"},
    "attn_out_bias": {"blocks.attn.b_O"},
    "mlp_bias": {"blocks.mlp.b_in", "blocks.mlp.b_gate", "blocks.mlp.b_out"},
    "unembed_bias": {"b_U"},
}


@pytest.mark.parametrize("flag", list(_BIASES))
def test_a_bias_that_is_off_is_no_parameter(flag):
    small = dict(TINY, n_layers=1, mlp="swiglu", norm="rmsnorm")
    every = _param_names(nnx.to_pure_dict(nnx.state(Transformer(ModelConfig(**small), rngs=nnx.Rngs(0)), nnx.Param)))
    off = ModelConfig(**small, **{flag: False})
    names = _param_names(nnx.to_pure_dict(nnx.state(Transformer(off, rngs=nnx.Rngs(0)), nnx.Param)))
    assert every - names == _BIASES[flag]
    assert names <= every


def test_absent_biases_are_zero_rows_of_the_decompositions():
    model, _, logits, cache = _family("mistral")  # RMSNorm, no bias anywhere
    names = _param_names(nnx.to_pure_dict(nnx.state(model, nnx.Param)))
    assert not any(name.rsplit(".", 1)[-1].startswith("b") for name in names), names
    parts = analysis.decompose_logits(model, cache)
    assert np.all(np.asarray(parts["bias"]) == 0)
    assert max_rel_err(parts.sum(), logits) <= 1e-4
    heads = analysis.head_results(model, cache, 0)
    assert np.all(np.asarray(heads["L0_b_O"]) == 0)


# ------------------------------------------------------------------------------ parallel blocks
def test_a_parallel_models_stream_and_its_decomposition_are_the_references():
    model, tokens, _, cache = _family("neox")
    _, streams = reference_run(*reference_inputs(model), np.asarray(tokens))
    for layer in range(model.cfg.n_layers):
        assert max_rel_err(cache["resid_pre"][layer], streams[layer]) < 1e-5, layer
        assert max_rel_err(analysis.decompose_resid(model, cache, layer).sum(), streams[layer]) < 1e-5, layer
    assert max_rel_err(cache["resid_final"], streams[-1]) < 1e-5
    # both writes of a layer enter the next layer's stream, neither one through the other
    pre, post = cache["resid_pre"][1], cache["resid_pre"][2]
    assert max_rel_err(post - pre, cache["attn_out"][1] + cache["mlp_out"][1]) < 1e-5


def test_removing_attention_in_a_parallel_block_leaves_what_its_mlp_reads():
    """Zeroed or deleted attention (or heads of it) adds nothing to its parallel block, whose MLP still
    reads the layer's input: the logits are the reference's with the same removal, the MLP beside it
    writes what it wrote before, and the next layer's MLP does not."""
    model, tokens, _, cache = _family("neox")
    params, cfg = reference_inputs(model)
    for layer, components, method, removed in (
        (0, ["0_attn_out"], "zero", dict(drop={(0, "attn")})),
        (0, ["0_attn_out"], "delete", dict(skip={(0, "attn")})),
        (1, ["L1H0", "L1H3"], "zero", dict(heads={(1, 0), (1, 3)})),
    ):
        ablation = interventions.make_ablation(cfg, components, method)
        logits, ablated = model.run_with_cache(
            tokens, ablation=ablation, replacement=interventions.zero_replacement(cfg)
        )
        assert max_rel_err(logits, reference_logits(params, cfg, np.asarray(tokens), **removed)) < 1e-5, components
        assert max_rel_err(A.ablate(model, tokens, components, method=method).logits, logits) <= 1e-6, components
        assert max_rel_err(ablated["mlp_out"][layer], cache["mlp_out"][layer]) <= 1e-6, components
        assert max_rel_err(ablated["mlp_out"][layer + 1], cache["mlp_out"][layer + 1]) > 1e-4, components
    both = reference_logits(params, cfg, np.asarray(tokens), drop={(2, "attn"), (2, "mlp")})
    assert max_rel_err(A.ablate(model, tokens, ["L2"]).logits, both) < 1e-5


# ------------------------------------------------------------------------------ configuration errors
@pytest.mark.parametrize(
    ("fields", "named"),
    [
        (dict(parallel_attn=True, norm_placement="post"), ["parallel_attn", "norm_placement='post'"]),
        (dict(parallel_attn=True, attn_only=True), ["parallel_attn", "attn_only=True"]),
        (dict(parallel_attn=True, residual=False), ["parallel_attn", "residual=False"]),
        (dict(n_kv_heads=3), ["n_kv_heads=3", "n_heads=4"]),
        (dict(n_kv_heads=0), ["n_kv_heads"]),
        (dict(positions="rotary", rotary_dim=3), ["rotary_dim=3", "even"]),
        (dict(positions="rotary", rotary_dim=10), ["rotary_dim=10", "d_head=8"]),
        (dict(rotary_dim=4), ["rotary_dim=4", "positions='rotary'"]),
        (dict(rope_scaling="linear", rope_factor=2.0), ["rope_scaling='linear'", "positions='rotary'"]),
        (dict(positions="rotary", rope_scaling="yarn"), ["rope_scaling='yarn'", "llama3"]),
        (dict(positions="rotary", rope_scaling="linear", rope_factor=0.5), ["rope_factor", "0.5"]),
        (
            dict(positions="rotary", rope_scaling="llama3", rope_low_freq_factor=4.0, rope_high_freq_factor=1.0),
            ["rope_low_freq_factor", "rope_high_freq_factor"],
        ),
        (dict(sliding_window=0), ["sliding_window"]),
        (dict(mlp="gelu_new"), ["mlp='gelu_new'", "gelu_exact"]),
    ],
    ids=lambda x: None if isinstance(x, list) else "-".join(f"{k}={v}" for k, v in x.items()),
)
def test_invalid_architecture_options_name_the_fields(fields, named):
    with pytest.raises(ConfigError) as err:
        ModelConfig(**{**TINY, **fields})
    for text in named:
        assert text in str(err.value), (text, str(err.value))
