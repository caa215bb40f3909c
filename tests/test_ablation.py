"""Ablation: masks and replacement values as data, single ablations against an independent
implementation, sweeps and deletion curves against single ablations, errors."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from conftest import built, grid_id, max_rel_err, roundoff_tolerance, sample
from reference import reference_logits
from resstream import ablation as A  # noqa: N812
from resstream import analysis, interventions, lane_plan, memory


def _loss(logits, tokens) -> float:
    return float(A.next_token_loss(jnp.asarray(logits, jnp.float32), tokens))


def _reference(model, tokens, **removed):
    params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    return reference_logits(params, model.cfg, np.asarray(tokens), **removed)


def test_ablating_nothing_returns_the_baseline_loss_exactly(sampled_arch):
    model, tokens, _, _ = built(**sampled_arch)
    baseline = A.next_token_loss(model(tokens), tokens)
    result = A.ablate(model, tokens, [])
    assert result.loss == baseline  # bit for bit: an all-False mask selects every original value
    assert jnp.array_equal(result.logits, model(tokens))


def test_a_sweeps_baseline_is_the_unablated_loss():
    model, tokens, _, _ = built(norm_placement="post")
    table = A.ablation_sweep(model, tokens, "layers", direct=False)
    assert table.baseline == A.next_token_loss(model(tokens), tokens)


@pytest.mark.parametrize("arch", sample()[1::3], ids=grid_id)  # 6 configs: every value of every axis
def test_zero_ablation_equals_the_write_removed_by_hand(arch):
    """Independent float64 numpy forward with the write replaced by zero (or left out)."""
    model, tokens, _, _ = built(**arch)
    last = model.cfg.n_layers - 1
    cases = [(["0_attn_out"], "zero", dict(drop={(0, "attn")})), ([f"L{last}H1"], "zero", dict(heads={(last, 1)}))]
    cases.append(([f"L{last}"], "delete", dict(skip={(last, "attn"), (last, "mlp")})))
    if not model.cfg.attn_only:
        cases.append((["1_mlp_out", "L0H2"], "zero", dict(drop={(1, "mlp")}, heads={(0, 2)})))
    for components, method, removed in cases:
        logits = A.ablate(model, tokens, components, method=method).logits
        expected = _reference(model, tokens, **removed)
        assert max_rel_err(logits, expected) < 1e-5, (components, method)
        assert max_rel_err(logits, _reference(model, tokens)) > 1e-4  # the ablation did change something


def test_deleting_a_layer_of_a_pre_ln_residual_model_is_zeroing_its_writes():
    model, tokens, _, _ = built()
    deleted = A.ablate(model, tokens, ["L1"], method="delete")
    zeroed = A.ablate(model, tokens, ["1_attn_out", "1_mlp_out"], method="zero")
    assert jnp.array_equal(deleted.logits, zeroed.logits)  # x + 0 == x exactly


@pytest.mark.parametrize("granularity", ["layers", "sublayers", "heads"])
@pytest.mark.parametrize("arch", sample()[1::3], ids=grid_id)
def test_each_row_of_a_sweep_equals_the_single_ablation(arch, granularity):
    model, tokens, _, _ = built(**arch)
    table = A.ablation_sweep(model, tokens, granularity, group_size=1)  # as many groups as there can be
    single = [float(A.ablate(model, tokens, [label]).loss) for label in table.labels]
    assert table.labels == tuple(interventions.component_labels(model.cfg, granularity))
    assert max_rel_err(table.loss, single) <= roundoff_tolerance(model.cfg)
    np.testing.assert_allclose(table.total, np.array(single) - float(table.baseline), atol=1e-5)


@pytest.mark.parametrize("method", ["mean", "resample", "delete"])
def test_sweep_rows_equal_single_ablations_for_every_method(method):
    model, tokens, _, _ = built(norm_placement="post", positions="rotary")
    reference = jnp.roll(tokens, 1, axis=0) if method == "resample" else None
    table = A.ablation_sweep(model, tokens, "sublayers", method=method, reference=reference)
    single = [float(A.ablate(model, tokens, [c], method=method, reference=reference).loss) for c in table.labels]
    assert max_rel_err(table.loss, single) <= roundoff_tolerance(model.cfg)


def test_sweep_in_chunks_equals_the_sweep_at_once():
    model, tokens, _, _ = built(mlp="swiglu")
    whole = A.ablation_sweep(model, tokens, "heads", chunk_size=64)
    chunked = A.ablation_sweep(model, tokens, "heads", chunk_size=5)  # 12 heads: chunks of 5, 5 and 2
    # 4 groups of 3 lanes, a head of each layer
    grouped = A.ablation_sweep(model, tokens, "heads", chunk_size=2, group_size=1)
    for part in (chunked, grouped):
        np.testing.assert_allclose(part.loss, whole.loss, rtol=1e-6)
        np.testing.assert_allclose(part.direct, whole.direct, rtol=1e-5, atol=1e-7)


def test_mean_ablation_over_the_same_batch_keeps_the_mean_write():
    model, tokens, _, cache = built()
    ablation = interventions.make_ablation(model.cfg, ["1_attn_out", "0_mlp_out", "L2H3"], "mean")
    values = interventions.replacement_for(model, tokens, "mean")
    _, ablated = model.run_with_cache(tokens, ablation=ablation, replacement=values)
    for name, layer in (("attn_out", 1), ("mlp_out", 0)):
        np.testing.assert_allclose(ablated[name][layer].mean(0), cache[name][layer].mean(0), rtol=1e-5, atol=1e-6)
        assert not np.allclose(ablated[name][layer], cache[name][layer])  # each sequence's write did change
    np.testing.assert_allclose(ablated["z"][2, :, :, 3].mean(0), cache["z"][2, :, :, 3].mean(0), atol=1e-6)


def test_mean_over_a_dataset_weights_every_sequence_equally():
    model, tokens, _, _ = built()
    other = jax.random.randint(jax.random.key(7), (3, tokens.shape[1]), 0, model.cfg.vocab_size)
    over_batches = interventions.mean_writes(model, [tokens, other])
    at_once = interventions.mean_writes(model, [jnp.concatenate([tokens, other])])
    for a, b in zip(jax.tree.leaves(over_batches), jax.tree.leaves(at_once), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    result = A.ablate(model, tokens, ["0_attn_out"], method="mean", reference=over_batches)
    assert np.isfinite(result.loss)


def test_resample_writes_the_reference_runs_values():
    model, tokens, _, _ = built()
    reference = jnp.roll(tokens, 1, axis=0)
    _, reference_cache = model.run_with_cache(reference)
    ablation = interventions.make_ablation(model.cfg, ["2_mlp_out"], "resample")
    _, ablated = model.run_with_cache(
        tokens, ablation=ablation, replacement=interventions.replacement_for(model, tokens, "resample", reference)
    )
    assert jnp.array_equal(ablated["mlp_out"][2], reference_cache["mlp_out"][2])


def test_ablations_vmap_like_any_pytree(sampled_arch):
    model, tokens, _, _ = built(**sampled_arch)
    labels = interventions.component_labels(model.cfg, "sublayers")[:3]
    stacked = interventions.stack([interventions.make_ablation(model.cfg, [label]) for label in labels])
    values = interventions.zero_replacement(model.cfg)

    @jax.jit
    def losses(masks):
        return jax.vmap(lambda m: A.next_token_loss(model(tokens, ablation=m, replacement=values), tokens))(masks)

    single = [float(A.ablate(model, tokens, [label]).loss) for label in labels]
    assert max_rel_err(losses(stacked), single) <= roundoff_tolerance(model.cfg)


def test_direct_effect_is_the_decomposition_row_removed():
    """Zero ablation: the direct effect of a component is the loss of the logits minus its row of
    decompose_logits; a plain network's early writes have no direct path at all."""
    model, tokens, logits, cache = built()
    table = A.ablation_sweep(model, tokens, "sublayers")
    rows = analysis.decompose_logits(model, cache)
    baseline = _loss(logits, tokens)
    for label, direct in zip(table.labels, table.direct, strict=True):
        assert abs(float(direct) - (_loss(logits - rows[label], tokens) - baseline)) < 1e-5
    heads = A.ablation_sweep(model, tokens, "heads")
    head_rows = analysis.decompose_logits(model, cache, split_heads=True)
    assert abs(float(heads.direct[5]) - (_loss(logits - head_rows["L1H1"], tokens) - baseline)) < 1e-5
    layers = A.ablation_sweep(model, tokens, "layers")
    both = rows["0_attn_out"] + rows["0_mlp_out"]
    assert abs(float(layers.direct[0]) - (_loss(logits - both, tokens) - baseline)) < 1e-5

    plain, plain_tokens, _, _ = built(residual=False)
    table = A.ablation_sweep(plain, plain_tokens, "sublayers")
    assert np.all(np.asarray(table.direct[:-1]) == 0) and table.direct[-1] != 0


def test_deletion_curve_rows_equal_single_deletions():
    for arch in ({}, {"residual": False}):
        model, tokens, _, _ = built(**arch)
        curve = A.deletion_curve(model, tokens, draws=2, seed=3, group_size=1)
        assert list(curve.ks) == [0, 1, 2, 3] and list(curve.by_k()) == [0, 1, 2, 3]
        assert [len(v) for v in curve.by_k().values()] == [1, 2, 2, 1]
        assert float(curve.loss[0]) == float(curve.baseline)
        for deleted, loss in zip(curve.deleted[1:], curve.loss[1:], strict=True):
            single = A.ablate(model, tokens, [f"L{layer}" for layer in deleted], method="delete").loss
            assert abs(float(loss) - float(single)) <= 1e-5 * abs(float(single))


def test_a_deletion_curve_of_given_subsets_equals_their_single_deletions():
    model, tokens, _, _ = built()
    curve = A.deletion_curve(model, tokens, subsets=[(0,), range(1, 3), (2, 0, -1)])
    assert curve.deleted == ((0,), (1, 2), (0, 2))  # sorted, distinct, -1 is the last layer
    for deleted, loss in zip(curve.deleted, curve.loss, strict=True):
        single = A.ablate(model, tokens, [f"L{layer}" for layer in deleted], method="delete").loss
        assert abs(float(loss) - float(single)) <= 1e-5 * abs(float(single))
    with pytest.raises(A.AblationError, match=r"layer=3 is out of range: the model has layers 0..2"):
        A.deletion_curve(model, tokens, subsets=[(0,), (3,)])
    with pytest.raises(A.AblationError, match=r"subsets must be sets of layer indices.*got \[1, 2\]"):
        A.deletion_curve(model, tokens, subsets=[1, 2])
    with pytest.raises(A.AblationError, match="subsets is empty"):
        A.deletion_curve(model, tokens, subsets=[])
    with pytest.raises(A.AblationError, match=r"give ks .* or subsets .*, not both"):
        A.deletion_curve(model, tokens, ks=[1], subsets=[(0,)])


def test_deletion_subsets_are_distinct_and_cover_small_k():
    subsets = A.deletion_subsets(6, [0, 1, 3, 6], draws=5, seed=0)
    assert subsets.count(()) == 1 and subsets[-1] == (0, 1, 2, 3, 4, 5)
    ones = [s for s in subsets if len(s) == 1]
    threes = [s for s in subsets if len(s) == 3]
    assert len(ones) == 5 and len(set(threes)) == 5  # C(6,1)=6 > 5 draws: sampled; all distinct
    with pytest.raises(A.AblationError, match="has 6"):
        A.deletion_subsets(6, [7], draws=2)


def test_bad_components_and_replacements_are_refused_with_the_valid_choices():
    model, tokens, _, _ = built()
    with pytest.raises(
        A.AblationError, match=r"unknown component 'blocks.1'.*L0..L2.*0_attn_out..2_attn_out.*L0H0..L2H3"
    ):
        A.ablate(model, tokens, ["blocks.1"])
    with pytest.raises(A.AblationError, match=r"head 4 in 'L1H4' is out of range: each layer has heads 0..3"):
        A.ablate(model, tokens, ["L1H4"])
    with pytest.raises(A.AblationError, match=r"'3_mlp_out': layer=3 is out of range: the model has layers 0\.\.2"):
        A.ablation_sweep(model, tokens, components=["3_mlp_out"])
    with pytest.raises(A.AblationError, match=r"shape \(1, 12\) but the ablated tokens \(2, 12\)"):
        A.ablate(model, tokens, ["L0"], method="resample", reference=tokens[:1])
    with pytest.raises(A.AblationError, match="seq length 5 but the ablated batch has 12"):
        A.ablate(model, tokens, ["L0"], method="mean", reference=tokens[:, :5])
    with pytest.raises(A.AblationError, match=r"choose one of \['zero', 'mean', 'resample', 'delete'\]"):
        A.ablate(model, tokens, ["L0"], method="knockout")
    with pytest.raises(A.AblationError, match="granularity='neurons'"):
        A.ablation_sweep(model, tokens, "neurons")
    with pytest.raises(A.AblationError, match="'delete' removes layers or sublayers"):
        A.ablate(model, tokens, ["L0H1"], method="delete")
    bad = interventions.zero_replacement(model.cfg).replace(attn_out=jnp.zeros((3, 5, 12, 32)))
    with pytest.raises(A.AblationError, match=r"attn_out has shape \(3, 5, 12, 32\).*\[3, 1 or 2, 1 or 12, 32\]"):
        A.ablate(model, tokens, ["L0"], reference=bad)
    with pytest.raises(A.AblationError, match="at least 2 tokens"):
        A.ablation_sweep(model, tokens[:, :1])
    with pytest.raises(A.AblationError, match="no deletions to run"):
        A.deletion_curve(model, tokens, ks=[])
    attn_only, attn_tokens, _, _ = built(attn_only=True)
    with pytest.raises(A.AblationError, match="attention-only model has no MLP"):
        A.ablate(attn_only, attn_tokens, ["0_mlp_out"])


def test_a_bfloat16_model_sweeps_like_its_single_ablations():
    model, tokens, _, _ = built(dtype="bfloat16")
    table = A.ablation_sweep(model, tokens, "sublayers", method="mean")
    single = [float(A.ablate(model, tokens, [c], method="mean").loss) for c in table.labels]
    assert np.all(np.isfinite(table.direct))
    assert max_rel_err(table.loss, single) < 1e-2  # bfloat16 activations, fused differently


@pytest.mark.parametrize(
    ("arch", "granularity", "method"),
    [
        ({}, "heads", "zero"),
        ({"parallel_attn": True, "positions": "rotary"}, "sublayers", "mean"),
        ({"norm_placement": "post", "deepnorm": True, "mlp": "swiglu"}, "layers", "delete"),
    ],
    ids=["pre-heads-zero", "parallel-sublayers-mean", "deepnorm-layers-delete"],
)
def test_a_deep_models_sweep_runs_in_cohorts_and_equals_single_ablations(monkeypatch, arch, granularity, method):
    """A model deeper than UNROLLED_LAYERS runs its jobs in cohorts, each from the first changed
    layer of its earliest job through one loop over the layers (here cohorts of at most 3 jobs
    over the 3 layers): every row still equals its single ablation, and so does every draw of a
    deletion curve, whose draw that deletes nothing starts past the last layer."""
    monkeypatch.setattr(lane_plan, "UNROLLED_LAYERS", 1)
    monkeypatch.setattr(lane_plan, "MIN_COHORTS", 2)
    monkeypatch.setattr(memory, "_compiled", type(memory._compiled)())
    model, tokens, _, _ = built(**arch)
    tokens = tokens[:, :9]  # a length no other sweep uses: no program compiled unrolled is reused
    four_layers = lane_plan.Schedule((0, 2, 4, 6), (False,) * 4, (-1,) * 4)  # first changes: layers 0, 1, 2, none
    cohorts = lane_plan.make_cohorts(model, four_layers, lane_plan.LanePlan(2, 2))
    assert cohorts.starts.tolist() == [0, 2] and cohorts.members.tolist() == [[0, 1], [2, 3]]
    table = A.ablation_sweep(model, tokens, granularity, method=method, group_size=2)
    single = [float(A.ablate(model, tokens, [label], method=method).loss) for label in table.labels]
    assert max_rel_err(table.loss, single) <= roundoff_tolerance(model.cfg)
    if method == "delete":
        curve = A.deletion_curve(model, tokens, draws=2, seed=3)
        for deleted, loss in zip(curve.deleted, curve.loss, strict=True):
            single = A.ablate(model, tokens, [f"L{layer}" for layer in deleted], method="delete").loss
            assert abs(float(loss) - float(single)) <= 1e-5 * abs(float(single))
