"""Memory budgets: calls stay within them by XLA's own accounting, shrink their plan to do so, give
the same results as without a budget, and refuse (before running) when nothing fits."""

import math
from types import SimpleNamespace

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from conftest import built
from resstream import ablation, analysis, lane_plan, memory, patching
from resstream.lane_plan import Schedule, make_groups
from resstream.memory import MemoryBudgetError, measure_only, resolve_budget

BIG = 1 << 40


def _measured(call) -> list:
    with measure_only() as measured:
        call()
    return measured


def test_a_sweep_shrinks_its_plan_to_fit_the_budget_and_gives_the_same_results():
    model, tokens, _, _ = built()

    def sweep(**kw):
        return ablation.ablation_sweep(model, tokens, "heads", **{"chunk_size": 12, **kw})

    (roomy,) = _measured(lambda: sweep(memory_budget=BIG))
    (smallest,) = _measured(lambda: sweep(memory_budget=BIG, chunk_size=1, group_size=1))
    assert roomy.plan.lanes == 12 and smallest.plan.lanes == 3  # every head at once / a head of each layer
    assert smallest.peak < roomy.peak
    budget = (smallest.peak + roomy.peak) // 2
    (fitted,) = _measured(lambda: sweep(memory_budget=budget))
    assert fitted.peak <= budget < roomy.peak and fitted.plan.lanes < roomy.plan.lanes
    expected, within = sweep(memory_budget=BIG), sweep(memory_budget=budget)
    np.testing.assert_allclose(within.loss, expected.loss, rtol=1e-6)
    np.testing.assert_allclose(within.direct, expected.direct, rtol=1e-5, atol=1e-7)
    with pytest.raises(MemoryBudgetError, match=r"needs .* GiB .* over its budget .* fewer or shorter sequences"):
        sweep(memory_budget=smallest.peak // 4)  # below what every plan needs


def test_a_deep_models_sweep_shrinks_its_cohorts_to_fit_the_budget(monkeypatch):
    """In cohorts (a deep model) the chunk is the lanes a cohort carries: one byte under the first
    plan's peak, a smaller chunk fits, with the same results."""
    monkeypatch.setattr(lane_plan, "UNROLLED_LAYERS", 1)
    monkeypatch.setattr(lane_plan, "MIN_COHORTS", 1)
    monkeypatch.setattr(memory, "_compiled", type(memory._compiled)())
    model, tokens, _, _ = built()
    tokens = tokens[:, :10]  # a length of its own: nothing traced unrolled is reused

    def sweep(**kw):
        return ablation.ablation_sweep(model, tokens, "heads", chunk_size=8, direct=False, **kw)

    (roomy,) = _measured(lambda: sweep(memory_budget=BIG))
    (fitted,) = _measured(lambda: sweep(memory_budget=roomy.peak - 1))
    assert fitted.peak < roomy.peak and fitted.plan.chunk < roomy.plan.chunk == 8
    np.testing.assert_allclose(sweep(memory_budget=roomy.peak - 1).loss, sweep(memory_budget=BIG).loss, rtol=1e-6)


def test_on_a_gpu_the_default_budget_also_keeps_a_call_within_the_room_there_now(monkeypatch):
    """With the default budget, a call on a GPU or TPU must also fit the room on its device now:
    the free bytes plus what its arguments already hold there. A sweep shrinks its plan to do so
    (same results), and a sweep and a patching grid refuse when nothing fits; a budget given
    explicitly is the whole check. The device's free bytes are stubbed: a CPU reports none."""
    model, tokens, _, _ = built()

    def sweep(**kw):
        return ablation.ablation_sweep(model, tokens, "heads", chunk_size=12, **kw)

    monkeypatch.setattr(memory, "free_device_memory", lambda device: None)  # as a CPU (or on a GPU too)
    (unchecked,) = _measured(sweep)
    assert unchecked.room is None
    monkeypatch.setattr(memory, "free_device_memory", lambda device: BIG)
    (roomy,) = _measured(sweep)
    assert roomy.plan == unchecked.plan
    resident = roomy.room - BIG  # the arguments already on the device: at least the parameters
    assert sum(x.nbytes for x in jax.tree.leaves(nnx.state(model))) <= resident < roomy.peak

    free = roomy.peak - resident - 1  # one byte short of the first plan
    monkeypatch.setattr(memory, "free_device_memory", lambda device: free)
    (fitted,) = _measured(sweep)
    assert fitted.peak <= fitted.room == free + resident and fitted.plan.lanes < roomy.plan.lanes
    assert fitted.peak <= fitted.budget  # the fraction of the device's memory still holds too
    np.testing.assert_allclose(sweep().loss, sweep(memory_budget=BIG).loss, rtol=1e-6)

    monkeypatch.setattr(memory, "free_device_memory", lambda device: 1 << 10)
    with pytest.raises(MemoryBudgetError, match=r"the device has only 0.00 GiB now .* fewer .* free arrays"):
        sweep()
    corrupted = np.asarray(tokens)[:, ::-1].copy()
    with pytest.raises(MemoryBudgetError, match="the device has only"):
        patching.patch_resid(model, tokens, corrupted, 1, 2)
    sweep(memory_budget=BIG)  # an explicit budget: the room now is not checked


def test_the_room_now_is_the_free_bytes_plus_what_the_arguments_hold_there(monkeypatch):
    gpu = SimpleNamespace(platform="gpu", memory_stats=lambda: {"bytes_limit": 100, "bytes_in_use": 30})
    assert memory.free_device_memory(gpu) == 70
    assert memory.free_device_memory(SimpleNamespace(platform="gpu", memory_stats=lambda: None)) is None
    assert memory.free_device_memory(SimpleNamespace(platform="cpu")) is None
    device = jax.devices()[0]  # several devices: tests/sharded_analysis.py
    on_device = jax.device_put(jnp.ones((4, 8), jnp.float32), device)
    leaves = [on_device, np.ones(100), 3.0]
    assert memory.resident_bytes(leaves, device) == 4 * 8 * 4
    monkeypatch.setattr(memory, "free_device_memory", lambda device: 1000)
    assert memory.room_now(leaves) == 1000 + 4 * 8 * 4
    assert memory.room_now([np.ones(100)]) == 1000  # nothing on a device: the default one's free bytes


def test_patching_and_deletion_fit_their_budget():
    model, tokens, _, _ = built()
    corrupted = np.asarray(tokens)[:, ::-1].copy()
    calls = {
        "patching": lambda budget: patching.patch_resid(model, tokens, corrupted, 1, 2, memory_budget=budget),
        "deletion": lambda budget: ablation.deletion_curve(model, tokens, draws=3, memory_budget=budget),
    }
    for name, call in calls.items():
        (roomy,) = _measured(lambda call=call: call(BIG))
        budget = roomy.peak - 1  # one byte short of the first plan: a smaller one must be found
        (fitted,) = _measured(lambda call=call, budget=budget: call(budget))
        assert fitted.peak <= budget, name
        assert (fitted.plan.lanes, fitted.plan.chunk) < (roomy.plan.lanes, roomy.plan.chunk), name


def test_single_programs_refuse_a_budget_they_exceed_and_say_how_to_need_less():
    model, tokens, _, cache = built()
    (forward,) = _measured(lambda: model.run_with_cache(tokens, memory_budget=BIG))
    assert forward.peak > 0 and forward.plan is None
    with pytest.raises(MemoryBudgetError, match="run fewer or shorter sequences, or record less"):
        model.run_with_cache(tokens, memory_budget=forward.peak - 1)
    model.run_with_cache(tokens, memory_budget=forward.peak)  # exactly enough is enough
    (lens,) = _measured(lambda: analysis.logit_lens(model, cache, memory_budget=BIG))
    with pytest.raises(MemoryBudgetError, match=r"logit_lens needs .* select less with pos="):
        analysis.logit_lens(model, cache, memory_budget=lens.peak - 1)
    (one_position,) = _measured(lambda: analysis.logit_lens(model, cache, pos=-1, memory_budget=BIG))
    assert one_position.peak < lens.peak


def test_measure_only_runs_nothing_and_returns_shapes():
    model, tokens, _, _ = built()
    with measure_only() as measured:
        logits, cache = model.run_with_cache(tokens)
        rows = analysis.decompose_logits(model, cache, pos=-1)
    assert [m.what for m in measured] == ["run_with_cache(mode='full') on tokens (2, 12)", "decompose_logits"]
    assert logits.shape == (*tokens.shape, model.cfg.vocab_size) and not hasattr(logits, "block_until_ready")
    assert rows.values.shape == (len(rows.labels), tokens.shape[0], model.cfg.vocab_size)


@pytest.mark.parametrize("bad", [0, -5, 1.5, True, "8GiB"])
def test_a_budget_must_be_a_positive_number_of_bytes(bad):
    with pytest.raises(MemoryBudgetError, match="give a positive number of bytes"):
        resolve_budget(bad)


def test_groups_share_one_structure_and_hold_every_job_once():
    # starts skewed as in a deletion curve: most jobs start at sublayer 0
    starts = (0,) * 7 + (2,) * 3 + (4,) + (6,) * 2
    schedule = Schedule(starts, (True,) * len(starts), (-1,) * len(starts))
    for lanes in (1, 4, 6, len(starts)):
        groups = make_groups(schedule, lanes)
        n_groups, n_slots = groups.members.shape
        assert n_slots <= max(lanes, 4)  # 4 structures: at least one slot each
        for g in range(n_groups):  # every group's slot holds a job of the slot's structure
            assert [starts[j] for j in groups.members[g]] == list(groups.slots.starts)
        assert sorted(set(groups.members.ravel())) == list(range(len(starts)))
        assert [groups.members.flat[groups.where[j]] for j in range(len(starts))] == list(range(len(starts)))
    assert make_groups(schedule, len(starts)).members.shape == (1, len(starts))  # room for all: no repeats


def test_deletion_subsets_are_drawn_without_enumerating():
    subsets = ablation.deletion_subsets(32, [16, 31, 32], draws=8, seed=1)  # C(32, 16) = 6e8
    assert len(subsets) == 8 + 8 + 1 and math.comb(32, 16) > 1e8
    assert len(set(subsets)) == len(subsets)
    sizes = [16] * 8 + [31] * 8 + [32]
    assert all(len(s) == k and list(s) == sorted(set(s)) for s, k in zip(subsets, sizes, strict=True))
    assert subsets == ablation.deletion_subsets(32, [16, 31, 32], draws=8, seed=1)
