"""benchmarks/accelerator.py, the one command a session with a GPU runs, works end to end: at its
tiny --smoke shape on this CPU, each of its worker kinds runs in its own process and reports."""

import re
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import xla_env

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "accelerator.py"


def _run(*args: str) -> subprocess.CompletedProcess:
    """The benchmark on the CPU even on a GPU machine (JAX and PyTorch both kept off the GPU)."""
    env = {**xla_env(), "CUDA_VISIBLE_DEVICES": ""}
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, timeout=600, env=env)


@pytest.mark.slow
def test_the_smoke_run_reports_the_train_step_and_every_analysis_call():
    proc = _run("--smoke", "--steps", "1", "--only", "dots,nanogpt,analysis")
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert "FAILED" not in proc.stdout, proc.stdout
    train = next(line for line in lines if line.startswith("resstream, cuDNN/auto, remat dots"))
    assert "tokens/s" in train and "compile" in train
    assert any(line.startswith("nanoGPT") for line in lines)  # measured, or skipped without torch
    for call in ("run_with_cache", "decompose_logits + logit_attrs", "ablation_sweep(heads), 4 ablations"):
        assert any(line.strip().startswith(call) and "first call" in line for line in lines), proc.stdout
    errors = re.search(r"decomposition - logits, relative: bfloat16 model (\S+), float32 model (\S+) ", proc.stdout)
    assert errors and float(errors[2]) < 1e-5 < float(errors[1]) < 2e-2, proc.stdout


@pytest.mark.slow
def test_a_failing_worker_is_reported_with_its_error_and_the_run_goes_on():
    failed = _run("--smoke", "--steps", "1", "--only", "dots,xla", "--batch", "0")
    assert failed.returncode == 0
    assert failed.stdout.count("FAILED: exit status 1: resstream.model.TokenError: tokens must hold") == 2


def test_an_unknown_measurement_is_refused():
    refused = _run("--only", "dots,bogus")
    assert refused.returncode == 2 and "--only: bogus: not among dots, nanogpt" in refused.stderr
