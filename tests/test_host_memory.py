"""resstream.host_memory: a training process reuses each step's buffers instead of paging them in anew."""

from __future__ import annotations

import ctypes.util
import os
import subprocess
import sys

import pytest

# The README's default model's train step, run repeatedly: its page faults per step, and the pages
# of its temporary buffer (what a step keeps for its backward pass).
PROGRAM = """
import resource
import jax
from flax import nnx
from resstream import ModelConfig, Transformer
from resstream.config import OptimizerConfig
from resstream.host_memory import reuse_step_buffers
from resstream.train import init_state, make_optimizer, train_step
print("set", reuse_step_buffers())
cfg = ModelConfig(vocab_size=256, n_layers=4, d_model=128, n_heads=4, n_ctx=128)
optimizer = make_optimizer(OptimizerConfig(total_steps=100))
graphdef, state = init_state(Transformer(cfg, rngs=nnx.Rngs(0)), optimizer, 0)
batch = jax.random.randint(jax.random.key(0), (1, 16, 129), 0, 256)
step = train_step.lower(state, batch, graphdef=graphdef, optimizer=optimizer, telemetry=False).compile()
for i in range(6):
    if i == 2:
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    state, metrics = step(state, batch)
    float(metrics["loss"])
faults = (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / 4
print("faults", faults, step.memory_analysis().temp_size_in_bytes // 4096)
"""


def faults_per_call(reuse: bool) -> tuple[bool, float, int]:
    env = {**os.environ, "RESSTREAM_REUSE_STEP_BUFFERS": "1" if reuse else "0", "JAX_PLATFORMS": "cpu"}
    out = subprocess.run([sys.executable, "-c", PROGRAM], env=env, capture_output=True, text=True, check=True)
    lines = dict(line.split(" ", 1) for line in out.stdout.splitlines())
    faults, pages = lines["faults"].split()
    return lines["set"] == "True", float(faults), int(pages)


@pytest.mark.slow
@pytest.mark.skipif(sys.platform != "linux" or "libc" not in str(ctypes.util.find_library("c")), reason="glibc only")
def test_a_training_process_reuses_its_step_buffers_and_the_switch_turns_it_off():
    was_set, faults, pages = faults_per_call(reuse=True)
    assert was_set
    assert faults < 0.05 * pages, f"{faults} page faults per call with buffers reused ({pages} pages)"
    was_set, faults, pages = faults_per_call(reuse=False)
    assert not was_set
    assert faults > 0.5 * pages, f"only {faults} page faults per call without reuse: the test shows nothing"
