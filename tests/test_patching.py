"""Activation patching of the residual stream: against a layer-by-layer run by hand."""

import jax.numpy as jnp
import numpy as np
import pytest

from conftest import built, max_rel_err, roundoff_tolerance
from resstream import lane_plan, memory
from resstream import patching as P  # noqa: N812
from resstream.interventions import AblationError
from resstream.stream import ResidualStream


def _pair(**arch):
    model, clean, logits, _ = built(**arch)
    corrupted = jnp.roll(clean, 1, axis=1)
    return model, clean, corrupted, logits


def _patched_by_hand(model, clean, corrupted, layer, position):
    """Corrupted run's stream entering `layer`, one position copied from the clean run, then the
    remaining layers one Block at a time."""
    record = ("resid_pre",)
    _, clean_cache = model.run_with_cache(clean, record=record)
    _, corrupted_cache = model.run_with_cache(corrupted, record=record)
    resid = corrupted_cache["resid_pre"][layer].at[:, position].set(clean_cache["resid_pre"][layer][:, position])
    stream = ResidualStream(resid, {}, residual=model.cfg.residual)
    for index in range(layer, model.cfg.n_layers):
        stream = model.layer(index)(stream, model.rope(clean.shape[1]))
    return model.unembed(stream.read())[0]


@pytest.mark.parametrize("arch", [{}, {"norm_placement": "post"}, {"residual": False}, {"attn_only": True}])
def test_patching_the_whole_clean_stream_at_layer_0_gives_the_clean_logits(arch):
    model, clean, corrupted, clean_logits = _pair(**arch)
    patched = P.run_patched(model, clean, corrupted, layer=0)
    assert max_rel_err(patched, clean_logits) <= roundoff_tolerance(model.cfg)
    assert max_rel_err(model(corrupted), clean_logits) > 1e-2


@pytest.mark.parametrize("arch", [{}, {"norm_placement": "post", "positions": "rotary"}, {"residual": False}])
def test_each_grid_cell_equals_the_patch_done_by_hand(arch):
    """Grid cells against the patch done by hand; the unpatched differences against the logits of
    plain forward passes, indexed here."""
    model, clean, corrupted, _ = _pair(**arch)
    answer, wrong = clean[:, -1], corrupted[:, -1]
    result = P.patch_resid(model, clean, corrupted, answer, wrong, group_size=1)  # one group per position
    seq, rows = clean.shape[1], jnp.arange(clean.shape[0])
    assert result.logit_diff.shape == (model.cfg.n_layers, seq)
    for layer, position in [(0, 3), (1, seq - 1), (2, 0), (2, 7)]:
        logits = _patched_by_hand(model, clean, corrupted, layer, position)
        expected = jnp.mean(logits[rows, -1, answer] - logits[rows, -1, wrong])
        assert abs(float(result.logit_diff[layer, position]) - float(expected)) < 1e-5
    some = P.patch_resid(model, clean, corrupted, answer, wrong, positions=[7, 0, -1])  # columns in that order
    np.testing.assert_allclose(some.logit_diff, result.logit_diff[:, [7, 0, seq - 1]], rtol=1e-5, atol=1e-6)
    for tokens, diff in ((clean, result.clean_diff), (corrupted, result.corrupted_diff)):
        logits = model(tokens)
        expected = jnp.mean(logits[rows, -1, answer] - logits[rows, -1, wrong])
        np.testing.assert_allclose(diff, expected, rtol=1e-5)


def test_a_deep_models_grid_runs_in_cohorts_and_equals_the_patch_done_by_hand(monkeypatch):
    """A model deeper than UNROLLED_LAYERS patches in cohorts that start before their later jobs'
    patched layers (here cohorts of 4 of the 27 cells, in layer order: cells (1, 1) and (2, 0) are
    patched mid-cohort): each patch still lands as its layer is entered."""
    monkeypatch.setattr(lane_plan, "UNROLLED_LAYERS", 1)
    monkeypatch.setattr(memory, "_compiled", type(memory._compiled)())
    model, clean, corrupted, _ = _pair(parallel_attn=True, positions="rotary")
    clean, corrupted = clean[:, :9], corrupted[:, :9]  # a length no unrolled grid uses: nothing compiled is reused
    answer, wrong, rows = clean[:, -1], corrupted[:, -1], jnp.arange(clean.shape[0])
    result = P.patch_resid(model, clean, corrupted, answer, wrong, chunk_size=4)
    for layer, position in [(1, 1), (2, 0)]:
        logits = _patched_by_hand(model, clean, corrupted, layer, position)
        expected = jnp.mean(logits[rows, -1, answer] - logits[rows, -1, wrong])
        assert abs(float(result.logit_diff[layer, position]) - float(expected)) < 1e-5
    patched = P.run_patched(model, clean, corrupted, layer=2, positions=[1, 5])
    by_hand = _patched_by_hand(model, clean, corrupted, 2, np.array([1, 5]))
    assert max_rel_err(patched, by_hand) <= roundoff_tolerance(model.cfg)


def test_recovered_is_one_where_the_patch_restores_everything():
    """Prompts that differ only in their last token: patching that position at layer 0 restores the
    clean run entirely (recovered = 1); patching any other position changes nothing (0)."""
    model, clean, _, _ = _pair()
    corrupted = clean.at[:, -1].set((clean[:, -1] + 1) % model.cfg.vocab_size)
    result = P.patch_resid(model, clean, corrupted, clean[:, -1], corrupted[:, -1])
    assert abs(float(result.recovered[0, -1]) - 1.0) < 1e-4
    np.testing.assert_allclose(result.recovered[:, :-1], 0.0, atol=1e-4)


def test_identical_prompts_leave_nothing_to_recover():
    """clean == corrupted: every patch changes nothing, so each cell's logit difference is the clean
    one, and `recovered` is NaN at every (layer, position) since there is nothing to recover."""
    model, clean, _, logits = _pair()
    answer, wrong = clean[:, -1], (clean[:, -1] + 1) % model.cfg.vocab_size
    result = P.patch_resid(model, clean, clean, answer, wrong)
    rows = jnp.arange(clean.shape[0])
    clean_diff = float(jnp.mean(logits[rows, -1, answer] - logits[rows, -1, wrong]))
    assert abs(float(result.clean_diff) - clean_diff) <= 1e-5 * abs(clean_diff)
    assert result.corrupted_diff == result.clean_diff  # the same run: exactly, or recovered is garbage
    assert result.recovered.shape == (model.cfg.n_layers, clean.shape[1])
    assert np.all(np.isnan(np.asarray(result.recovered)))
    np.testing.assert_allclose(result.logit_diff, np.full(result.logit_diff.shape, clean_diff), rtol=1e-5)


def test_patching_refuses_mismatched_prompts_and_bad_answers():
    model, clean, corrupted, _ = _pair()
    with pytest.raises(AblationError, match=r"shape \(2, 12\) and corrupted tokens \(2, 11\)"):
        P.patch_resid(model, clean, corrupted[:, 1:], 0, 1)
    with pytest.raises(AblationError, match=r"answer_tokens must be token ids in \[0, 61\)"):
        P.patch_resid(model, clean, corrupted, 99, 1)
    with pytest.raises(P.AblationError, match="positions must be indices"):
        P.patch_resid(model, clean, corrupted, 0, 1, positions=[clean.shape[1]])
    with pytest.raises(AblationError, match=r"layer=3 is out of range: the model has layers 0\.\.2"):
        P.run_patched(model, clean, corrupted, layer=3)
    with pytest.raises(AblationError, match=r"positions 0\.\.11"):
        P.run_patched(model, clean, corrupted, layer=0, positions=[12])
