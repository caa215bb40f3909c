import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from conftest import BATCH, SEQ, TINY, built, max_rel_err, randomize, reference_inputs, roundoff_tolerance, sample
from reference import reference_logits
from resstream import ModelConfig, TokenError, Transformer
from resstream import analysis as A  # noqa: N812  (the short name reads better in tests)
from resstream.cache_view import _run_compiled


def test_compiled_analysis_equals_eager(sampled_arch):
    model, tokens, _logits, cache = built(**sampled_arch)
    calls = {
        "decompose_logits": lambda: A.decompose_logits(model, cache, split_heads=True),
        "decompose_resid": lambda: A.decompose_resid(model, cache, 1, pos=slice(1, 4)),
        "logit_attrs": lambda: A.logit_attrs(model, cache, tokens, 3, batch=1, select_tokens=True),
        "logit_lens": lambda: A.logit_lens(model, cache, pos=-1),
        "head_results": lambda: A.head_results(model, cache, 0),
    }
    for name, call in calls.items():
        compiled = call()
        with jax.disable_jit():
            eager = call()
        assert compiled.labels == eager.labels, name
        np.testing.assert_allclose(compiled.values, eager.values, rtol=1e-5, atol=1e-5, err_msg=name)


def test_decompose_logits_sums_to_the_logits(sampled_arch):
    model, _tokens, logits, cache = built(**sampled_arch)
    for split_heads in (False, True):
        parts = A.decompose_logits(model, cache, split_heads=split_heads)
        assert parts.labels[-1] == "bias" and parts.values.shape[1:] == logits.shape
        assert max_rel_err(parts.sum(), logits) <= 1e-4


def test_decompose_resid_sums_to_the_stream_at_every_layer(sampled_arch):
    model, _tokens, _logits, cache = built(**sampled_arch)
    for layer in range(model.cfg.n_layers):
        assert max_rel_err(A.decompose_resid(model, cache, layer).sum(), cache["resid_pre"][layer]) <= 1e-5
        if not model.cfg.attn_only:
            mid = A.decompose_resid(model, cache, layer, mid=True, split_heads=True)
            assert max_rel_err(mid.sum(), cache["resid_mid"][layer]) <= 1e-5
    assert max_rel_err(A.decompose_resid(model, cache).sum(), cache["resid_final"]) <= 1e-5


def test_logit_lens_reads_every_layer_and_ends_at_the_logits(sampled_arch):
    """Each row of the lens is the logits of the model cut short at that point: computed here by
    the independent float64 implementation (tests/reference.py) with every later sublayer left out,
    which applies the final norm with its own scale, then W_U and b_U."""
    model, tokens, logits, cache = built(**sampled_arch)
    cfg = model.cfg
    lens = A.logit_lens(model, cache, mid=True)
    assert lens.labels[0] == "0_pre" and lens.labels[-1] == "final"
    assert max_rel_err(lens["final"], logits) <= 1e-5
    params, reference_cfg = reference_inputs(model)
    sublayers = [(layer, kind) for layer in range(cfg.n_layers) for kind in ("attn", "mlp")]
    for layer in range(cfg.n_layers):
        points = {f"{layer}_pre": 2 * layer} | ({} if cfg.attn_only else {f"{layer}_mid": 2 * layer + 1})
        for label, kept in points.items():
            expected = reference_logits(params, reference_cfg, np.asarray(tokens), skip=set(sublayers[kept:]))
            assert max_rel_err(lens[label], expected) <= 1e-5, label
    resid = A.accumulated_resid(model, cache, mid=True)
    for layer in range(cfg.n_layers):
        assert max_rel_err(resid[f"{layer}_pre"], cache["resid_pre"][layer]) <= 1e-5


def test_head_results_plus_b_O_sum_to_attn_out(sampled_arch):
    model, _tokens, _logits, cache = built(**sampled_arch)
    every = A.head_results(model, cache)
    assert len(every) == model.cfg.n_layers * (model.cfg.n_heads + 1)
    for layer in range(model.cfg.n_layers):
        heads = A.head_results(model, cache, layer)
        assert heads.labels == (*[f"L{layer}H{h}" for h in range(model.cfg.n_heads)], f"L{layer}_b_O")
        assert max_rel_err(heads.sum(), cache["attn_out"][layer]) <= 1e-5


def test_neuron_results_sum_to_mlp_out():
    model, tokens, _logits, _ = built(**{"mlp": "swiglu"})
    _, cache = model.run_with_cache(tokens, record=("mlp_post",))
    neurons = A.neuron_results(model, cache, 1, pos=-1)
    assert len(neurons) == model.cfg.d_mlp + 1 and neurons.labels[-1] == "L1_b_out"
    assert max_rel_err(neurons.sum(), cache["mlp_out"][1][:, -1]) <= 1e-5


def test_logit_attrs_equal_decomposed_logits_of_the_chosen_tokens(sampled_arch):
    model, tokens, logits, cache = built(**sampled_arch)
    full = A.decompose_logits(model, cache)
    targets = jnp.roll(tokens, -1, axis=1)
    attrs = A.logit_attrs(model, cache, targets)
    picked = jnp.take_along_axis(
        full.values, jnp.broadcast_to(targets[None, ..., None], (*full.values.shape[:3], 1)), -1
    )
    assert attrs.labels == full.labels
    np.testing.assert_allclose(attrs.values, picked[..., 0], atol=1e-4 * float(jnp.abs(logits).max()))
    diff = A.logit_attrs(model, cache, targets, incorrect_tokens=3)
    np.testing.assert_allclose(
        diff.values, picked[..., 0] - full.values[..., 3], atol=2e-4 * float(jnp.abs(logits).max())
    )


def test_logit_attrs_take_byte_ids_of_any_integer_dtype():
    """ByteTokenizer.encode gives uint8 ids, which cannot hold a vocabulary size of 256: the ids are
    widened before they are checked, not compared in uint8 (where every id looked out of range)."""
    model, tokens, _, cache = built(vocab_size=256)
    targets = np.asarray(jnp.roll(tokens, -1, axis=1))
    wide = A.logit_attrs(model, cache, targets.astype(np.int32))
    assert np.isfinite(np.asarray(wide.values)).all()
    np.testing.assert_array_equal(A.logit_attrs(model, cache, targets.astype(np.uint8)).values, wide.values)
    with pytest.raises(ValueError, match="integer token ids"):
        A.logit_attrs(model, cache, targets.astype(np.float32))


def test_position_and_batch_selection_equal_slicing_the_full_result():
    model, tokens, logits, cache = built(**{"norm_placement": "post"})
    full = A.decompose_logits(model, cache, split_heads=True)
    one = A.decompose_logits(model, cache, split_heads=True, pos=-1, batch=1)
    np.testing.assert_allclose(one.values, full.values[:, 1, -1], rtol=1e-6, atol=1e-6)
    some = A.decompose_resid(model, cache, 2, pos=slice(2, 5), batch=jnp.array([1, 0]))
    np.testing.assert_allclose(
        some.values, A.decompose_resid(model, cache, 2).values[:, jnp.array([1, 0]), 2:5], rtol=1e-6
    )
    attrs = A.logit_attrs(model, cache, tokens, pos=3, select_tokens=True)
    np.testing.assert_allclose(attrs.values, A.logit_attrs(model, cache, tokens).values[:, :, 3], rtol=1e-5, atol=1e-5)
    lens = A.logit_lens(model, cache, pos=0, batch=0)
    np.testing.assert_allclose(lens["final"], logits[0, 0], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("placement", ["pre", "post"])
def test_each_row_belongs_to_its_label(placement):
    """Silencing one component zeroes exactly its row: the labels are not merely a partition that
    happens to sum correctly."""
    cfg = ModelConfig(**{**TINY, "norm_placement": placement})
    model = randomize(Transformer(cfg, rngs=nnx.Rngs(0)))
    for name in ("W_O", "b_O"):
        param = getattr(model.blocks.attn, name)
        param[...] = param[...].at[1].set(0.0)
    model.blocks.attn.W_O[...] = model.blocks.attn.W_O[...].at[2, 3].set(0.0)  # head L2H3
    tokens = jax.random.randint(jax.random.key(0), (2, 8), 0, cfg.vocab_size)
    logits, cache = model.run_with_cache(tokens)
    parts = A.decompose_logits(model, cache, split_heads=True)
    zero_rows = {label for label, row in parts if not jnp.any(row)}
    assert zero_rows == {"L1H0", "L1H1", "L1H2", "L1H3", "L1_b_O", "L2H3"}
    assert max_rel_err(parts.sum(), logits) <= 1e-5


def test_pre_ln_rows_are_the_frozen_scale_formula():
    """Row c of a pre-LN LayerNorm model is ((c - mean c) / scale_final * w_final) @ W_U, computed
    here directly from the recorded write."""
    model, _tokens, _logits, cache = built(**{})
    parts = A.decompose_logits(model, cache)
    c = np.asarray(cache["mlp_out"][2], np.float64)
    w = np.asarray(model.ln_final.w[...], np.float64)
    expected = (c - c.mean(-1, keepdims=True)) / np.asarray(cache["ln_final_scale"], np.float64) * w
    expected = expected @ np.asarray(model.W_U[...], np.float64)
    assert max_rel_err(parts["2_mlp_out"], expected) < 1e-5


def test_decomposition_is_exact_in_training_mode_too():
    cfg = ModelConfig(**{**TINY, "dropout": 0.3, "stochastic_depth": 0.5})
    model = randomize(Transformer(cfg, rngs=nnx.Rngs(0)))
    tokens = jax.random.randint(jax.random.key(0), (4, 8), 0, cfg.vocab_size)
    logits, cache = model.run_with_cache(tokens, rng=jax.random.key(5))
    assert max_rel_err(A.decompose_logits(model, cache).sum(), logits) <= 1e-5


def test_analysis_functions_compose_with_jit():
    model, tokens, _logits, cache = built(**{"positions": "rotary"})
    graphdef, state = nnx.split(model)

    @jax.jit
    def attribute(state, tokens):
        m = nnx.merge(graphdef, state)
        _logits, cache = m.run_with_cache(tokens)
        return A.logit_attrs(m, cache, tokens[:, -1], pos=-1)

    attrs = attribute(state, tokens)
    expected = A.logit_attrs(model, cache, tokens, pos=-1, select_tokens=True).values
    np.testing.assert_allclose(attrs.values, expected, rtol=1e-5, atol=1e-5)


def test_errors_name_the_valid_choices():
    model, _tokens, _logits, cache = built(**{"attn_only": True})
    with pytest.raises(ValueError, match=r"layers 0\.\.2"):
        A.decompose_resid(model, cache, 7)
    with pytest.raises(ValueError, match="attention-only model has none"):
        A.decompose_resid(model, cache, 1, mid=True)
    with pytest.raises(ValueError, match="no MLP neurons"):
        A.neuron_results(model, cache, 0)
    full_model, full_tokens, _, _ = built(**{})
    _, stats = full_model.run_with_cache(full_tokens, mode="stats")
    with pytest.raises(KeyError, match="run_with_cache\\(tokens\\) \\(mode='full'\\)"):
        A.decompose_logits(full_model, stats)
    _, plain = full_model.run_with_cache(full_tokens)
    with pytest.raises(KeyError, match="record=\\('mlp_post',\\)"):
        A.neuron_results(full_model, plain, 0)
    with pytest.raises(KeyError, match="no row 'L9H0'"):
        A.head_results(full_model, plain, 0)["L9H0"]


def test_out_of_range_token_ids_raise():
    """JAX gathers clamp: id 300 of a 61-token vocabulary would silently read token 60's column."""
    model, tokens, _logits, cache = built(**{})
    for bad in (300, 61, -1):
        with pytest.raises(TokenError, match=rf"token id {bad} is outside the vocabulary \[0, 61\)"):
            A.logit_attrs(model, cache, bad)
    with pytest.raises(TokenError, match=r"token id -1 .*`incorrect_tokens`.*not Python indices"):
        A.logit_attrs(model, cache, tokens, incorrect_tokens=-1)
    with pytest.raises(TokenError, match=r"token id 61 .*`tokens` holds it \(at index \[1, 4\]\)"):
        A.logit_attrs(model, cache, tokens.at[1, 4].set(61), pos=0, select_tokens=True)  # even where not selected


def test_out_of_range_pos_and_batch_raise():
    """An int, or any entry of an index array, outside -n..n-1 raises instead of reading the last
    row; in-range negative indices still count from the end, and slices keep Python semantics."""
    model, tokens, _logits, cache = built(**{})
    calls = {
        "logit_attrs": lambda **kw: A.logit_attrs(model, cache, tokens, select_tokens=True, **kw),
        "decompose_logits": lambda **kw: A.decompose_logits(model, cache, **kw),
        "decompose_resid": lambda **kw: A.decompose_resid(model, cache, 1, **kw),
        "logit_lens": lambda **kw: A.logit_lens(model, cache, **kw),
        "accumulated_resid": lambda **kw: A.accumulated_resid(model, cache, **kw),
        "head_results": lambda **kw: A.head_results(model, cache, 0, **kw),
    }
    positions = r"the cache holds 12 positions \(0\.\.11, or -12\.\.-1 from the end\)"
    sequences = r"the cache holds 2 sequences \(0\.\.1, or -2\.\.-1 from the end\)"
    cases = [
        (dict(pos=99), rf"pos=99 is out of range: {positions}"),
        (dict(pos=-99), rf"pos=-99 is out of range: {positions}"),
        (dict(pos=12), r"pos=12 is out of range"),
        (dict(pos=-13), r"pos=-13 is out of range"),
        (dict(batch=5), rf"batch=5 is out of range: {sequences}"),
        (dict(batch=-3, pos=0), r"batch=-3 is out of range"),
        (dict(pos=jnp.array([0, 12, 99])), rf"pos entry 12 \(at index \[1\]\) is out of range: {positions}"),
        (dict(batch=np.array([[0], [-3]])), r"batch entry -3 \(at index \[1, 0\]\) is out of range"),
        (dict(batch=[1, 2]), r"batch entry 2 \(at index \[1\]\) is out of range"),
    ]
    for name, call in calls.items():
        for kwargs, message in cases:
            with pytest.raises(IndexError, match=message):
                call(**kwargs)
                pytest.fail(f"{name}(**{kwargs}) did not raise")
    # the bounds themselves are valid and count from the end
    lo = A.logit_attrs(model, cache, tokens, pos=-12, batch=-2, split_heads=True, select_tokens=True).values
    np.testing.assert_array_equal(
        lo, A.logit_attrs(model, cache, tokens[0, 0], pos=0, batch=0, split_heads=True).values
    )
    hi = A.decompose_resid(model, cache, 1, pos=jnp.array([-1, 11]), batch=slice(-5, 9))
    np.testing.assert_array_equal(hi.values[:, :, 0], hi.values[:, :, 1])
    np.testing.assert_array_equal(hi.values, A.decompose_resid(model, cache, 1, pos=jnp.array([11, 11])).values)


def test_traced_out_of_range_indices_give_nan_rows_inside_jit():
    """Inside a user's jit the indices cannot raise: a bad position, sequence or token id gives NaN
    in exactly its rows (never another row's values), and the good entries are unchanged."""
    model, tokens, _logits, cache = built(**{})
    graphdef, state = nnx.split(model)

    @jax.jit
    def attrs(state, cache, targets, incorrect, pos, batch):
        m = nnx.merge(graphdef, state)
        return A.logit_attrs(m, cache, targets, incorrect, pos=pos, batch=batch, select_tokens=True).values

    targets = jnp.roll(tokens, -1, axis=1)
    bad_targets = targets.at[0, 3].set(61).at[1, 5].set(-1)
    bad_incorrect = jnp.full_like(tokens, 7).at[1, 2].set(-61)
    pos, batch = jnp.array([3, 12, -1, -13, 5, 2]), jnp.array([0, 2, -1, -3])
    got = np.asarray(attrs(state, cache, bad_targets, bad_incorrect, pos, batch))
    good_pos = jnp.where((pos >= -12) & (pos < 12), pos, 0)
    good_batch = jnp.where((batch >= -2) & (batch < 2), batch, 0)
    expected = np.asarray(
        A.logit_attrs(model, cache, targets, 7, pos=good_pos, batch=good_batch, select_tokens=True).values
    )
    nan = np.zeros(got.shape[1:], bool)
    nan[:, [1, 3]] = True  # positions 12 and -13
    nan[[1, 3], :] = True  # sequences 2 and -3
    nan[0, 0] = True  # sequence 0, position 3: target id 61
    nan[2, 4] = True  # sequence -1, position 5: target id -1 (not wrapped to the last token)
    nan[2, 5] = True  # sequence -1, position 2: incorrect id -61
    assert np.isnan(got[:, nan]).all()
    np.testing.assert_array_equal(got[:, ~nan], expected[:, ~nan])

    @jax.jit
    def logits(state, cache, pos, batch):
        return A.decompose_logits(nnx.merge(graphdef, state), cache, split_heads=True, pos=pos, batch=batch).values

    # every row NaN, the bias rows (b_O, final bias) that never read the cache included
    got = np.asarray(logits(state, cache, jnp.array([99, 4]), jnp.array(-1)))
    assert np.isnan(got[:, 0]).all() and not np.isnan(got[:, 1]).any()
    expected = A.decompose_logits(model, cache, split_heads=True, pos=jnp.array([0, 4]), batch=jnp.array(-1)).values
    np.testing.assert_array_equal(got[:, 1], expected[:, 1])
    assert np.isnan(logits(state, cache, jnp.array([0, 4]), jnp.array(2))).all()


def test_static_out_of_range_indices_raise_inside_jit():
    """A Python int is known at trace time, so it raises inside a user's jit too."""
    model, _tokens, _logits, cache = built(**{})
    with pytest.raises(IndexError, match=r"pos=99 is out of range: the cache holds 12 positions"):
        jax.jit(lambda cache: A.logit_attrs(model, cache, 3, pos=99).values)(cache)
    with pytest.raises(IndexError, match=r"batch=-3 is out of range"):
        jax.jit(lambda cache: A.logit_lens(model, cache, batch=-3).values)(cache)
    with pytest.raises(TokenError, match=r"token id 300 is outside the vocabulary \[0, 61\)"):
        jax.jit(lambda cache: A.logit_attrs(model, cache, 300).values)(cache)


def test_integer_positions_and_sequences_compile_once():
    """An int `pos` / `batch` is traced, not a static argument: a loop over positions or sequences
    is one compiled program, not one per index, and every index still reads its own row."""
    model, tokens, _logits, cache = built(**{})
    targets = jnp.roll(tokens, -1, axis=1)
    full_attrs, full_logits = A.logit_attrs(model, cache, targets).values, A.decompose_logits(model, cache).values
    loops = {
        "logit_attrs, pos": (range(-SEQ, SEQ), lambda p: A.logit_attrs(model, cache, targets[:, p], pos=p)),
        "decompose_logits, pos": (range(-SEQ, SEQ), lambda p: A.decompose_logits(model, cache, pos=p)),
        "logit_attrs, batch": (range(-BATCH, BATCH), lambda b: A.logit_attrs(model, cache, targets[b], batch=b)),
        "decompose_logits, batch": (range(-BATCH, BATCH), lambda b: A.decompose_logits(model, cache, batch=b)),
    }
    expected = {
        "logit_attrs, pos": lambda p: full_attrs[:, :, p],
        "decompose_logits, pos": lambda p: full_logits[:, :, p],
        "logit_attrs, batch": lambda b: full_attrs[:, b],
        "decompose_logits, batch": lambda b: full_logits[:, b],
    }
    for name, (indices, call) in loops.items():
        before, compiled = _run_compiled._cache_size(), []
        for i in indices:
            np.testing.assert_allclose(call(i).values, expected[name](i), rtol=1e-5, atol=1e-5, err_msg=f"{name}={i}")
            compiled.append(_run_compiled._cache_size() - before)
        assert compiled[0] <= 1 and set(compiled) == {compiled[0]}, f"{name}: compiles after each call {compiled}"


def test_tokens_shaped_like_the_selection_are_not_selected_again():
    """By default `tokens` are shaped like the selection, whatever that shape is: ids for an index
    array of every position (here reversed) are used as given, not selected a second time because
    their shape happens to be the cache's [batch, seq]. `select_tokens=True` selects ids given for
    the whole cache; a shape that fits neither is refused, naming both."""
    model, tokens, _logits, cache = built(**{})
    targets = jnp.roll(tokens, -1, axis=1)
    reverse = np.arange(SEQ)[::-1]
    full = A.logit_attrs(model, cache, targets, incorrect_tokens=5).values
    given = A.logit_attrs(model, cache, targets[:, reverse], incorrect_tokens=5, pos=reverse)
    np.testing.assert_allclose(given.values, full[:, :, reverse], rtol=1e-5, atol=1e-5)
    selected = A.logit_attrs(model, cache, targets, incorrect_tokens=5, pos=reverse, select_tokens=True)
    np.testing.assert_allclose(selected.values, full[:, :, reverse], rtol=1e-5, atol=1e-5)
    every = A.logit_attrs(model, cache, targets, incorrect_tokens=5, pos=slice(None))
    np.testing.assert_allclose(every.values, full, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match=r"tokens has shape \(2, 12\), which does not fit the selection's shape "):
        A.logit_attrs(model, cache, targets, pos=3)  # the whole cache's ids, without select_tokens=True
    with pytest.raises(ValueError, match=r"incorrect_tokens has shape \(2, 3\): with select_tokens=True, pass ids "):
        A.logit_attrs(model, cache, targets, targets[:, :3], pos=slice(0, 3), select_tokens=True)


def test_layer_minus_one_is_the_final_stream_as_in_transformer_lens():
    """For a point in the stream, None, -1 and n_layers are the final stream and no other negative
    layer is taken; for head and neuron results, which name a layer, -1 is the last layer."""
    model, tokens, _logits, cache = built(**{"mlp": "swiglu"})
    n = model.cfg.n_layers
    for name, call in {"decompose_resid": A.decompose_resid, "accumulated_resid": A.accumulated_resid}.items():
        final = call(model, cache, pos=-1)
        for layer in (-1, n):
            got = call(model, cache, layer, pos=-1)
            assert got.labels == final.labels, name
            np.testing.assert_array_equal(got.values, final.values, err_msg=name)
    assert final.labels == (*[f"{layer}_pre" for layer in range(n)], "final")
    with pytest.raises(ValueError, match=r"layer=-2: only -1 \(the final stream\) counts from the end here, "):
        A.decompose_resid(model, cache, -2)
    with pytest.raises(ValueError, match=r"pass layer=1 \(n_layers-2\) for the stream entering layer 1"):
        A.accumulated_resid(model, cache, -2)
    with pytest.raises(ValueError, match=r"layer=-4 is out of range: the model has layers 0\.\.2"):
        A.decompose_resid(model, cache, -4)
    with pytest.raises(ValueError, match="not the final stream"):
        A.decompose_resid(model, cache, -1, mid=True)
    np.testing.assert_array_equal(
        A.head_results(model, cache, -1, pos=-1).values, A.head_results(model, cache, n - 1, pos=-1).values
    )
    _, with_post = model.run_with_cache(tokens, record=("mlp_post",))
    last = A.neuron_results(model, with_post, -1, pos=-1)
    assert last.labels[-1] == f"L{n - 1}_b_out"
    assert max_rel_err(last.sum(), with_post["mlp_out"][n - 1][:, -1]) <= 1e-5


def test_deepnorm_sweeps_and_patches_equal_single_runs():
    """Sweeps and patching rebuild the stream sublayer by sublayer (resstream.vectorised), so with
    DeepNorm they too must carry alpha * x: sweep rows against single ablations (zero and delete), a
    patched cell against the corrupted run's stream patched and run on layer by layer."""
    from resstream import ablation, patching

    model, tokens, _, cache = built(**next(kw for kw in sample() if kw.get("deepnorm")))
    for granularity, method in (("sublayers", "zero"), ("layers", "delete")):
        table = ablation.ablation_sweep(model, tokens, granularity, method=method, group_size=1)
        single = [float(ablation.ablate(model, tokens, [label], method=method).loss) for label in table.labels]
        assert max_rel_err(table.loss, single) <= roundoff_tolerance(model.cfg), method
        np.testing.assert_allclose(table.total, np.array(single) - float(table.baseline), atol=1e-5)
    corrupted = jnp.roll(tokens, 1, axis=1)
    answer, wrong, rows = tokens[:, -1], corrupted[:, -1], jnp.arange(BATCH)
    result = patching.patch_resid(model, tokens, corrupted, answer, wrong, group_size=1)
    _, corrupted_cache = model.run_with_cache(corrupted, record=("resid_pre",))
    layer, position = 1, 4
    resid = corrupted_cache["resid_pre"][layer].at[:, position].set(cache["resid_pre"][layer][:, position])
    stream = model.embed(corrupted).replace(resid=resid)  # the model's stream settings: alpha included
    for index in range(layer, model.cfg.n_layers):
        stream = model.layer(index)(stream, model.rope(SEQ))
    logits = model.unembed(stream.read())[0]
    expected = jnp.mean(logits[rows, -1, answer] - logits[rows, -1, wrong])
    assert abs(float(result.logit_diff[layer, position]) - float(expected)) < 1e-5
