import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from conftest import TINY, built, max_rel_err, randomize, reference_inputs, roundoff_tolerance
from reference import reference_logits
from resstream import ConfigError, ModelConfig, TokenError, Transformer
from resstream.config import base_config


def test_forward_matches_independent_numpy_implementation(arch):
    model, tokens, logits, _ = built(**arch)
    expected = reference_logits(*reference_inputs(model), np.asarray(tokens))
    assert max_rel_err(logits, expected) < 1e-5


def test_recording_never_changes_the_logits(sampled_arch):
    # On the sample (every value of every axis), not the whole grid: recording is one code path
    # whatever the architecture, and two more compiles per configuration cost the suite most of a
    # minute; the forward pass itself is checked on the whole grid above.
    model, tokens, logits_full, _ = built(**sampled_arch)
    logits_off = model(tokens)
    logits_stats, stats = model.run_with_cache(tokens, mode="stats")
    assert jnp.array_equal(logits_stats, logits_off)
    assert max_rel_err(logits_full, logits_off) <= roundoff_tolerance(model.cfg)
    assert stats["attn_out_norm"].shape == (model.cfg.n_layers,)


def test_optional_records_never_change_the_logits(sampled_arch):
    model, tokens, logits_full, _ = built(**sampled_arch)
    logits, cache = model.run_with_cache(tokens, record=("pattern", "mlp_post"))
    assert max_rel_err(logits, logits_full) <= roundoff_tolerance(model.cfg)
    assert cache["pattern"].shape == (model.cfg.n_layers, tokens.shape[0], model.cfg.n_heads, *tokens.shape[1:] * 2)
    np.testing.assert_allclose(cache["pattern"].sum(-1), 1.0, rtol=1e-5)
    assert jnp.all(jnp.triu(cache["pattern"], k=1) == 0)  # causal


def test_scan_equals_layer_by_layer_unrolled(sampled_arch):
    model, tokens, logits, _ = built(**sampled_arch)
    stream = model.embed(tokens).replace(residual=model.cfg.residual)
    rope = model.rope(tokens.shape[1])
    for index in range(model.cfg.n_layers):
        stream = model.layer(index)(stream, rope)
    unrolled, _ = model.unembed(stream.read())
    assert max_rel_err(unrolled, logits) <= roundoff_tolerance(model.cfg)


def test_stats_mode_records_per_layer_norms_and_cosines():
    model, tokens, _, cache = built(**{})
    _, stats = model.run_with_cache(tokens, mode="stats")
    attn = cache["attn_out"]  # [n_layers, batch, seq, d_model]
    resid = cache["resid_pre"]
    np.testing.assert_allclose(stats["attn_out_norm"], jnp.linalg.norm(attn, axis=-1).mean((1, 2)), rtol=1e-5)
    np.testing.assert_allclose(stats["resid_pre_norm"], jnp.linalg.norm(resid, axis=-1).mean((1, 2)), rtol=1e-5)
    cos = jnp.sum(attn * resid, -1) / (jnp.linalg.norm(attn, axis=-1) * jnp.linalg.norm(resid, axis=-1))
    np.testing.assert_allclose(stats["attn_out_cos"], cos.mean((1, 2)), rtol=1e-4, atol=1e-6)
    assert np.all(np.abs(stats["mlp_out_cos"]) <= 1.0)


def _count_equations(jaxpr) -> int:
    """Equations in a jaxpr and, recursively, in every jaxpr nested in it (jit, scan bodies)."""
    total = 0
    for eqn in jaxpr.eqns:
        total += 1
        for param in eqn.params.values():
            for sub in param if isinstance(param, tuple | list) else (param,):
                inner = getattr(sub, "jaxpr", sub)
                if hasattr(inner, "eqns"):
                    total += _count_equations(inner)
    return total


def test_layers_are_scanned_so_the_program_does_not_grow_with_depth():
    def program_size(n_layers: int) -> int:
        cfg = ModelConfig(**{**TINY, "n_layers": n_layers})
        graphdef, state = nnx.split(nnx.eval_shape(lambda: Transformer(cfg, rngs=nnx.Rngs(0))))
        tokens = jax.ShapeDtypeStruct((2, 8), jnp.int32)
        jaxpr = jax.make_jaxpr(lambda s, t: nnx.merge(graphdef, s).run_with_cache(t))(state, tokens)
        return _count_equations(jaxpr.jaxpr)

    small = program_size(2)
    assert small > 50  # the whole model is counted, not just an outer call
    assert program_size(200) == small


def test_training_mode_is_random_and_eval_mode_is_not():
    cfg = ModelConfig(**{**TINY, "dropout": 0.2, "stochastic_depth": 0.5})
    model = Transformer(cfg, rngs=nnx.Rngs(0))
    tokens = jnp.ones((2, 8), jnp.int32)
    assert jnp.array_equal(model(tokens), model(tokens))
    a, b = model(tokens, rng=jax.random.key(0)), model(tokens, rng=jax.random.key(1))
    assert not jnp.allclose(a, b)
    assert jnp.array_equal(a, model(tokens, rng=jax.random.key(0)))


def test_training_mode_without_dropout_equals_eval():
    model, tokens, _logits, _ = built(**{})
    assert jnp.array_equal(model(tokens, rng=jax.random.key(3)), model(tokens))


def test_stochastic_depth_drops_whole_layers_per_sequence():
    cfg = ModelConfig(**{**TINY, "n_layers": 2, "stochastic_depth": 0.9})
    model = randomize(Transformer(cfg, rngs=nnx.Rngs(0)))
    tokens = jnp.ones((64, 4), jnp.int32)
    _, cache = model.run_with_cache(tokens, rng=jax.random.key(0))
    # layer 0 has drop probability 0; layer 1 has 0.9: its writes are zero for a dropped sequence
    # and scaled by 1 / (1 - 0.9) for a kept one, for both sublayers alike.
    assert jnp.all(jnp.any(cache["attn_out"][0] != 0, axis=(1, 2)))
    dropped = jnp.all(cache["attn_out"][1] == 0, axis=(1, 2))
    assert jnp.array_equal(dropped, jnp.all(cache["mlp_out"][1] == 0, axis=(1, 2)))
    assert 0.75 < float(dropped.mean()) < 1.0


def test_bfloat16_compute_is_close_to_float32():
    model, tokens, logits, _ = built(**{})
    cfg = ModelConfig(**{**TINY, "dtype": "bfloat16"})
    low = Transformer(cfg, rngs=nnx.Rngs(0))
    nnx.update(low, nnx.state(model, nnx.Param))
    low_logits = low(tokens)
    assert low_logits.dtype == jnp.float32
    assert max_rel_err(low_logits, logits) < 5e-2


@pytest.mark.parametrize(
    ("tokens", "message"),
    [
        (np.array([[1, 2, 61]]), "token id 61 at [batch 0, position 2] is outside the vocabulary [0, 61)"),
        (np.array([[1, -1, 3]]), "token id -1 at [batch 0, position 1]"),
        (np.zeros((1, 17), np.int32), "sequence length 17 exceeds the model's context n_ctx=16"),
        (np.zeros((5,), np.int32), "use tokens[None] for a single sequence"),
        (np.zeros((1, 3), np.float32), "tokens must be integer ids"),
        (np.zeros((1, 0), np.int32), "at least one sequence of one token"),
    ],
)
def test_bad_tokens_raise_clear_errors(tokens, message):
    model, *_ = built(**{})
    with pytest.raises(TokenError) as err:
        model(tokens)
    assert message in str(err.value)
    with pytest.raises(TokenError):
        model.run_with_cache(tokens)


def test_out_of_vocabulary_ids_under_jit_give_nan_not_a_clamped_row():
    model, *_ = built(**{})
    graphdef, state = nnx.split(model)
    forward = jax.jit(lambda s, t: nnx.merge(graphdef, s)(t))
    logits = forward(state, jnp.array([[1, 2, 3], [4, 61, 5]]))
    assert jnp.all(jnp.isfinite(logits[0]))
    assert jnp.all(jnp.isnan(logits[1, 1:]))  # the bad id and every position that attends to it


def test_unknown_recording_mode_and_record():
    model, tokens, *_ = built(**{})
    with pytest.raises(ValueError, match="choose one of \\['off', 'stats', 'full'\\]"):
        model.run_with_cache(tokens, mode="everything")
    with pytest.raises(ValueError, match="optional records are"):
        model.run_with_cache(tokens, record=("attn_scores",))


def test_gradients_reach_every_parameter_through_the_compiled_scan():
    model, tokens, _logits, _ = built(**{"positions": "rotary", "mlp": "swiglu"})
    graphdef, state = nnx.split(model)

    def loss(state):
        logits = nnx.merge(graphdef, state)(tokens)
        return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), tokens[..., None], -1))

    grads = jax.grad(loss)(state)
    for path, grad in jax.tree_util.tree_leaves_with_path(nnx.to_pure_dict(grads)):
        assert jnp.all(jnp.isfinite(grad)), path
        assert jnp.any(grad != 0), path
    # and they are the gradients of the function: a finite difference along them agrees
    step = 1e-3
    direction = jax.tree.map(lambda g: g / jnp.sqrt(sum(jnp.sum(x**2) for x in jax.tree.leaves(grads))), grads)
    moved = jax.tree.map(lambda p, d: p + step * d, state, direction)
    slope = (loss(moved) - loss(state)) / step
    expected = sum(jnp.sum(g * d) for g, d in zip(jax.tree.leaves(grads), jax.tree.leaves(direction), strict=True))
    assert abs(float(slope) - float(expected)) < 0.05 * abs(float(expected))


def test_deepnorm_stream_is_the_norm_of_alpha_times_the_stream_plus_the_write():
    """Layer 0 by hand in float64, from the weights and the cache: attention's norm gives
    ln1(alpha * x + attn_out), the MLP's gives ln2(alpha * resid_mid + mlp_out), the stream entering layer 1."""
    cfg = ModelConfig(**{**TINY, "n_layers": 2, "norm_placement": "post", "deepnorm": True})
    model = randomize(Transformer(cfg, rngs=nnx.Rngs(0)))
    tokens = jax.random.randint(jax.random.key(1), (2, 12), 0, cfg.vocab_size)
    _, cache = model.run_with_cache(tokens, record=("resid_pre", "resid_mid"))
    c = {name: np.asarray(x, np.float64) for name, x in cache.items()}
    alpha = 4**0.25
    assert cfg.residual_scale == pytest.approx(alpha)

    def norm(x, name):  # layer 0's LayerNorm `name`
        w, b = (np.asarray(p[0], np.float64) for p in (getattr(model.blocks, name).w, getattr(model.blocks, name).b))
        x = x - x.mean(-1, keepdims=True)
        return x / np.sqrt((x**2).mean(-1, keepdims=True) + cfg.norm_eps) * w + b

    np.testing.assert_allclose(c["resid_pre"][0], c["embed"] + c["pos_embed"])
    assert max_rel_err(c["resid_mid"][0], norm(alpha * c["resid_pre"][0] + c["attn_out"][0], "ln1")) < 1e-5
    assert max_rel_err(c["resid_pre"][1], norm(alpha * c["resid_mid"][0] + c["mlp_out"][0], "ln2")) < 1e-5
    assert max_rel_err(c["resid_pre"][1], norm(c["resid_mid"][0] + c["mlp_out"][0], "ln2")) > 1e-2  # alpha matters


def test_deepnorm_init_scales_the_value_path_by_beta():
    """W_V, W_O, W_in, W_gate, W_out drawn with std init_std * beta; W_Q, W_K with init_std. At 8 layers
    beta = 64^(-1/4) ~ 0.354, far (by 10%) from both 1 and GPT-2's 1 / sqrt(16) = 0.25 for W_O, W_out; with
    32k+ samples a sample std is within 0.5% of the true one."""
    kw = {**TINY, "n_layers": 8, "d_model": 64, "mlp": "swiglu", "norm_placement": "post"}
    cfg = ModelConfig(**kw, deepnorm=True)
    assert cfg.deepnorm_beta == pytest.approx(64**-0.25)
    blocks = Transformer(cfg, rngs=nnx.Rngs(0)).blocks
    init = cfg.init_std
    expected = {"W_Q": init, "W_K": init, "W_V": init * cfg.deepnorm_beta, "W_O": init * cfg.deepnorm_beta}
    expected |= {name: init * cfg.deepnorm_beta for name in ("W_in", "W_gate", "W_out")}
    for name, std in expected.items():
        weight = getattr(blocks.attn if name in ("W_Q", "W_K", "W_V", "W_O") else blocks.mlp, name)
        assert weight.size >= 32_768
        assert abs(float(np.std(weight[...])) / std - 1) < 0.1, name
    plain = Transformer(ModelConfig(**kw), rngs=nnx.Rngs(0)).blocks  # GPT-2's scaled init without DeepNorm
    assert abs(float(np.std(plain.attn.W_O[...])) / (init / 4) - 1) < 0.1
    assert abs(float(np.std(plain.attn.W_V[...])) / init - 1) < 0.1


def test_deepnorm_needs_a_post_ln_residual_model_and_old_configs_load_without_it():
    fix = "set norm_placement='post' and residual=True, or deepnorm=False"
    with pytest.raises(ConfigError, match=fix):
        ModelConfig(deepnorm=True)  # pre-LN
    with pytest.raises(ConfigError, match=fix):
        ModelConfig(norm_placement="post", residual=False, deepnorm=True)
    old = ModelConfig(norm_placement="post").to_dict()
    del old["deepnorm"]  # a model config saved before the field existed
    assert ModelConfig.from_dict(old) == ModelConfig(norm_placement="post")
    assert base_config().model.deepnorm is False
    assert ModelConfig(norm_placement="post", deepnorm=True).residual_scale == pytest.approx(8**0.25)
    assert ModelConfig(norm_placement="post").residual_scale == 1.0
