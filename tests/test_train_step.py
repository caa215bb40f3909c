import functools

import jax
import jax.extend as jex
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from conftest import TINY
from resstream import ModelConfig, Transformer
from resstream.checkpoint import CheckpointError, Checkpoints
from resstream.train import OptimizerConfig, decay_mask, init_state, make_optimizer, optimizer_step, train_step


def _setup(**model):
    cfg = ModelConfig(**{**TINY, **model})
    optimizer = make_optimizer(OptimizerConfig(warmup_steps=0, total_steps=10))
    graphdef, state = init_state(Transformer(cfg, rngs=nnx.Rngs(0)), optimizer, 0)
    return cfg, optimizer, graphdef, state


def test_gradient_accumulation_equals_the_large_batch():
    cfg, _, graphdef, state = _setup()
    _, _, _, twin = _setup()
    # Plain SGD makes the update the gradient itself (Adam's first step is about sign(g), which
    # turns rounding in near-zero gradients into large relative differences).
    optimizer = optax.sgd(1.0)
    state = state.replace(opt_state=optimizer.init(state.params))
    twin = twin.replace(opt_state=optimizer.init(twin.params))
    batch = jax.random.randint(jax.random.key(0), (8, 9), 0, cfg.vocab_size)
    whole, m_whole = train_step(state, batch[None], graphdef=graphdef, optimizer=optimizer)
    halves, m_halves = train_step(twin, batch.reshape(2, 4, 9), graphdef=graphdef, optimizer=optimizer)
    np.testing.assert_allclose(m_halves["loss"], m_whole["loss"], rtol=1e-6)
    for a, b in zip(jax.tree.leaves(whole.params), jax.tree.leaves(halves.params), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)


def test_weight_decay_applies_to_matrices_only():
    _, _, _, state = _setup()
    mask = nnx.to_pure_dict(decay_mask(state.params))
    flat = {"/".join(str(k) for k in path): v for path, v in jax.tree_util.tree_leaves_with_path(mask)}
    decayed = {name.split("/")[-1].strip("[]'") for name, v in flat.items() if v}
    assert decayed == {"W_E", "W_pos", "W_U", "W_Q", "W_K", "W_V", "W_O", "W_in", "W_out"}


def test_bfloat16_compute_trains_with_float32_state():
    cfg, optimizer, graphdef, state = _setup(dtype="bfloat16")
    batch = jax.random.randint(jax.random.key(0), (1, 4, 9), 0, cfg.vocab_size)
    for _ in range(3):
        state, metrics = train_step(state, batch, graphdef=graphdef, optimizer=optimizer)
        assert bool(metrics["finite"])
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(state.params))


def _equations(jaxpr: jex.core.Jaxpr):
    """Every equation of `jaxpr`, those inside scans, remats and nested jits included."""
    for eqn in jaxpr.eqns:
        yield eqn
        for param in eqn.params.values():
            for sub in param if isinstance(param, tuple | list) else (param,):
                if isinstance(sub, jex.core.ClosedJaxpr):
                    yield from _equations(sub.jaxpr)
                elif isinstance(sub, jex.core.Jaxpr):
                    yield from _equations(sub)


def _traced_step(dtype: str) -> tuple[list, list[tuple[str, ...]]]:
    """The train step (telemetry on) traced: the dtypes of every value, and of each matmul's operands."""
    _, optimizer, graphdef, state = _setup(dtype=dtype)
    step = functools.partial(optimizer_step, graphdef=graphdef, optimizer=optimizer, telemetry=True)
    jaxpr = jax.make_jaxpr(step)(state, jnp.zeros((1, 2, 9), jnp.int32)).jaxpr
    eqns = list(_equations(jaxpr))
    dtypes = [v.aval.dtype for e in eqns for v in [*e.invars, *e.outvars] if hasattr(getattr(v, "aval", None), "dtype")]
    matmuls = [tuple(str(v.aval.dtype) for v in e.invars) for e in eqns if e.primitive.name == "dot_general"]
    return dtypes, matmuls


def test_float32_mode_never_rounds_to_bfloat16_and_bfloat16_mode_multiplies_in_it():
    """dtype="float32" (the all-float32 mode): not one bfloat16 value in the whole train step.
    dtype="bfloat16": no matmul takes two float32 operands (the only float32 ones are the float32
    cotangents of the products accumulated in float32: the logits and attention scores)."""
    dtypes, matmuls = _traced_step("float32")
    assert jnp.bfloat16 not in dtypes and set(matmuls) == {("float32", "float32")}
    dtypes, matmuls = _traced_step("bfloat16")
    assert ("float32", "float32") not in matmuls
    assert matmuls.count(("bfloat16", "bfloat16")) > len(matmuls) // 2


def test_bfloat16_and_float32_compute_give_the_same_loss_to_bfloat16_precision():
    cfg, optimizer, graphdef, state = _setup(dtype="float32")
    batch = jax.random.randint(jax.random.key(0), (1, 4, 9), 0, cfg.vocab_size)
    graphdef_bf16, _ = nnx.split(Transformer(ModelConfig(**{**TINY, "dtype": "bfloat16"}), rngs=nnx.Rngs(0)))
    _, exact = train_step(state, batch, graphdef=graphdef, optimizer=optimizer)
    _, _, _, state = _setup(dtype="float32")  # the first call donated it
    _, rounded = train_step(state, batch, graphdef=graphdef_bf16, optimizer=optimizer)
    assert exact["loss"] != rounded["loss"]
    np.testing.assert_allclose(rounded["loss"], exact["loss"], rtol=1e-2)


def test_checkpoints_restore_across_runtime_fields_and_refuse_other_models(tmp_path):
    """remat and attention change how the model is computed, not which model it is; a checkpoint
    written before the attention field existed still restores."""
    cfg, _, _, state = _setup()
    saved = {k: v for k, v in cfg.to_dict().items() if k != "attention"}
    Checkpoints(tmp_path).save(1, state, {"model_config": saved})
    _, _, _, target = _setup(remat="full", attention="xla")
    restored, _ = Checkpoints(tmp_path).restore(target, ModelConfig(**{**TINY, "remat": "full", "attention": "xla"}))
    for a, b in zip(jax.tree.leaves(restored), jax.tree.leaves(state), strict=True):
        np.testing.assert_array_equal(a, b)
    with pytest.raises(CheckpointError, match="residual: saved True vs now False"):
        Checkpoints(tmp_path).restore(target, ModelConfig(**{**TINY, "residual": False}))


def test_checkpoints_keep_the_last_k_and_the_best(tmp_path):
    checkpoints = Checkpoints(tmp_path, keep_last=2)
    state = {"x": jnp.arange(3.0)}
    for step, val_loss in zip(range(1, 6), [3.0, 1.0, 2.0, 4.0, 5.0], strict=True):
        checkpoints.save(step, state, {"step": step}, val_loss=val_loss)
    assert checkpoints.all_steps() == [2, 4, 5]


def test_remat_policies_give_the_same_loss_and_gradients():
    results = []
    for remat in ("none", "dots", "full"):
        cfg = ModelConfig(**{**TINY, "remat": remat})
        model = Transformer(cfg, rngs=nnx.Rngs(0))
        graphdef, params = nnx.split(model, nnx.Param)
        tokens = jax.random.randint(jax.random.key(0), (2, 9), 0, cfg.vocab_size)

        def loss(params, graphdef=graphdef, tokens=tokens):
            logits = nnx.merge(graphdef, params)(tokens[:, :-1])
            return optax.softmax_cross_entropy_with_integer_labels(logits, tokens[:, 1:]).mean()

        results.append(jax.value_and_grad(loss)(params))
    (loss_none, grads_none), *others = results
    for loss_other, grads_other in others:
        np.testing.assert_allclose(loss_other, loss_none, rtol=1e-6)
        for a, b in zip(jax.tree.leaves(grads_other), jax.tree.leaves(grads_none), strict=True):
            np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-7)
