"""The NVIDIA GPU path, lowered for CUDA on this CPU (never compiled or run): a bfloat16 model with
cuDNN's fused attention lowers its train step under each remat policy, with telemetry, and its
analyses and a head sweep, so what only a GPU's programs contain (cuDNN's custom calls, `dense`'s
non-CPU gradient) is checked before a GPU is there to run it. jax's cuDNN version and GPU checks
are stubbed as on an H100 (skipped if a JAX version moves them)."""

import functools
import re
from types import SimpleNamespace

import jax
import jax.numpy as jnp
import pytest
from flax import nnx

import resstream.layers as layers
from conftest import stub_cudnn_checks
from resstream import ModelConfig, Transformer, analysis, devices
from resstream.ablation import ablation_sweep
from resstream.train import OptimizerConfig, init_state, make_optimizer, optimizer_step

H100 = SimpleNamespace(platform="gpu", device_kind="NVIDIA H100 80GB HBM3", compute_capability="9.0")
# cuDNN's fused attention forward and backward, as jax's lowering names their custom calls
CUDNN_CALL, BACKWARD = re.compile(r"custom_call @__cudnn\$fmha\w*"), "Backward"


@pytest.fixture
def on_an_h100(monkeypatch):
    stub_cudnn_checks(monkeypatch, H100.compute_capability)
    monkeypatch.setattr(layers, "attention_implementation", lambda cfg: devices.attention_implementation(cfg, H100))


def _model(**fields) -> Transformer:
    cfg = ModelConfig(vocab_size=64, n_layers=2, d_model=64, n_heads=2, n_ctx=32, dtype="bfloat16", **fields)
    model = Transformer(cfg, rngs=nnx.Rngs(0))
    assert model.blocks.attn.implementation == "cudnn"
    return model


def _for_cuda(fn, *args) -> str:
    return jax.jit(fn).trace(*args).lower(lowering_platforms=("cuda",)).as_text()


def _cudnn_calls(text: str) -> tuple[int, int]:
    """(forward, backward) cuDNN attention custom calls in a lowered program."""
    calls = CUDNN_CALL.findall(text)
    return sum(BACKWARD not in c for c in calls), sum(BACKWARD in c for c in calls)


# Mistral's architecture: rotary positions, grouped-query attention, a sliding window, RMSNorm, SwiGLU
MISTRAL = dict(positions="rotary", n_kv_heads=1, sliding_window=8, norm="rmsnorm", mlp="swiglu")


@pytest.mark.parametrize(
    ("remat", "forwards", "architecture"),
    [("none", 1, {}), ("dots", 1, {}), ("full", 2, {}), ("dots", 1, MISTRAL)],
)
def test_the_train_step_lowers_for_cuda_with_cudnn_attention(on_an_h100, remat, forwards, architecture):
    """One forward call in the layer scan's body, and one more (the recomputation) under "full"
    only: "dots" keeps cuDNN's outputs for the backward."""
    optimizer = make_optimizer(OptimizerConfig(warmup_steps=0, total_steps=10))
    graphdef, state = init_state(_model(remat=remat, **architecture), optimizer, 0)
    batch = jnp.zeros((1, 4, 33), jnp.int32)  # [accumulation, batch, seq + 1]
    step = functools.partial(optimizer_step, graphdef=graphdef, optimizer=optimizer, telemetry=True)
    assert _cudnn_calls(_for_cuda(step, state, batch)) == (forwards, 1)


def test_the_analyses_and_a_sweep_lower_for_cuda_with_cudnn_attention(on_an_h100):
    model = _model()
    graphdef, params = nnx.split(model)
    tokens = jnp.zeros((2, 32), jnp.int32)

    def analyses(params, tokens):
        model = nnx.merge(graphdef, params)
        _, cache = model.run_with_cache(tokens)
        decomposed = analysis.decompose_logits(model, cache, split_heads=True, pos=-1)
        attrs = analysis.logit_attrs(model, cache, tokens, split_heads=True)
        return decomposed.values, attrs.values, ablation_sweep(model, tokens, "heads").loss

    forwards, backwards = _cudnn_calls(_for_cuda(analyses, params, tokens))
    assert forwards >= 2 and backwards == 0  # the cached forward and the sweep's; nothing differentiated
