"""Real training runs of a tiny model on a slice of the built-in corpus."""

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import pytest

from conftest import shared_dir, tiny_config, xla_env
from resstream.checkpoint import CheckpointError, Checkpoints
from resstream.config import base_config
from resstream.loop import DivergenceError, run
from resstream.telemetry import read_log

ROOT = Path(__file__).resolve().parent.parent


def losses(run_dir: Path) -> list[tuple[int, float]]:
    return [(r["step"], r["loss"]) for r in read_log(run_dir) if "loss" in r]


def unigram_entropy(tokens: np.ndarray) -> float:
    counts = np.bincount(tokens, minlength=256).astype(np.float64)
    p = counts[counts > 0] / counts.sum()
    return float(-(p * np.log(p)).sum())


@pytest.mark.slow
def test_training_beats_the_unigram_entropy_of_its_data(corpus_slice, tmp_path):
    config = tiny_config(
        corpus_slice, tmp_path, steps=400, batch_size=16, eval_every=200, eval_batches=4, tensorboard=True
    )
    summary = run(config, tmp_path / "run")
    from resstream.data import tokenized_corpus

    entropy = unigram_entropy(
        np.asarray(tokenized_corpus(str(corpus_slice), "validation", tmp_path / "cache", validation_fraction=0.1))
    )
    assert summary["status"] == "completed" and summary["step"] == 400
    assert summary["val_loss"] < entropy - 0.5, (summary["val_loss"], entropy)
    files = {p.name for p in (tmp_path / "run").iterdir()}
    assert {"loss.png", "stream.png", "gradients.png", "report.md", "samples.txt", "metrics.jsonl"} <= files
    assert any((tmp_path / "run" / "tensorboard").iterdir())
    assert "Direct logit attribution" in (tmp_path / "run" / "report.md").read_text()
    record = read_log(tmp_path / "run")[-1]
    assert len(record["layer_grad_norm"]) == 2 and len(record["layer_attn_out_cos"]) == 2


def test_telemetry_on_and_off_give_identical_losses(corpus_slice, tmp_path):
    on = run(tiny_config(corpus_slice, tmp_path, steps=12, telemetry=True), tmp_path / "on")
    off = run(tiny_config(corpus_slice, tmp_path, steps=12, telemetry=False), tmp_path / "off")
    assert on["val_loss"] == off["val_loss"]
    assert losses(tmp_path / "on") == losses(tmp_path / "off")
    assert "layer_attn_out_norm" in read_log(tmp_path / "on")[0]
    assert "layer_attn_out_norm" not in read_log(tmp_path / "off")[0]


def test_non_finite_loss_stops_the_run_and_writes_no_checkpoint(corpus_slice, tmp_path, corrupt_batch):
    """The divergence is read at the next logged step (30), not at once; the run still names step
    25, applies nothing from it on, and saves no checkpoint after it."""
    corrupt_batch(24)
    config = tiny_config(corpus_slice, tmp_path, steps=40, log_every=10)
    with pytest.raises(DivergenceError) as err:
        run(config, tmp_path / "run")
    assert "step 25: loss nan is not finite" in str(err.value)
    assert "non-finite gradients in layers [0, 1] (first: layer 0)" in str(err.value)
    assert Checkpoints(tmp_path / "run" / "checkpoints").all_steps() == [10, 20]


def _train_process(config_overrides: list[str], run_dir: Path) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "train.py", "--config", "configs/tiny.py", f"--run_dir={run_dir}", *config_overrides],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=xla_env(),
    )


def _overrides(corpus: Path, tmp_path: Path, steps: int, checkpoint_every: int) -> list[str]:
    return [
        "--config.model.n_ctx=32",
        f"--config.data.source={corpus}",
        f"--config.data.cache_dir={tmp_path / 'cache'}",
        f"--config.train.steps={steps}",
        f"--config.train.checkpoint_every={checkpoint_every}",
        "--config.train.log_every=1",
        "--config.train.eval_every=1000000",
        "--config.train.batch_size=8",
        "--config.train.progress=False",
        "--config.train.tensorboard=False",
        "--config.train.sample_tokens=8",
    ]


def _wait_for(predicate, process: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.time() + timeout
    while not predicate():
        if process.poll() is not None:
            raise AssertionError(f"the run ended early: {process.communicate()}")
        assert time.time() < deadline, "timed out"
        time.sleep(0.05)


@pytest.mark.slow
def test_a_killed_run_resumes_exactly(corpus_slice, tmp_path):
    steps = 60  # the victim is killed right after its first checkpoint (step 10)
    args = _overrides(corpus_slice, tmp_path, steps, checkpoint_every=10)
    reference = _train_process(args, tmp_path / "reference")
    assert reference.wait(timeout=300) == 0, reference.communicate()

    victim = _train_process(args, tmp_path / "killed")
    first = tmp_path / "killed" / "checkpoints" / "10"
    _wait_for(lambda: first.exists() and not any(p.name.endswith(".tmp") for p in first.parent.iterdir()), victim)
    victim.send_signal(signal.SIGKILL)
    victim.wait()
    killed_at = max(step for step, _ in losses(tmp_path / "killed"))
    assert killed_at < steps, "the run finished before it could be killed"

    resumed = _train_process(args, tmp_path / "killed")
    out, err = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, err
    assert "resumed from step" in out
    assert losses(tmp_path / "killed") == losses(tmp_path / "reference")
    assert [s for s, _ in losses(tmp_path / "reference")] == list(range(1, steps + 1))


@pytest.mark.slow
def test_sigterm_writes_a_complete_checkpoint(corpus_slice, tmp_path):
    process = _train_process(_overrides(corpus_slice, tmp_path, 100_000, checkpoint_every=100_000), tmp_path / "run")
    _wait_for(
        lambda: len(losses(tmp_path / "run")) >= 5 if (tmp_path / "run" / "metrics.jsonl").exists() else False, process
    )
    process.send_signal(signal.SIGTERM)
    _out, err = process.communicate(timeout=120)
    assert process.returncode == 0, err
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["status"].startswith("stopped by signal SIGTERM")
    checkpoints = Checkpoints(tmp_path / "run" / "checkpoints")
    assert checkpoints.all_steps() == [summary["step"]]
    from flax import nnx

    from resstream.config import model_config, optimizer_config
    from resstream.model import Transformer
    from resstream.train import init_state, make_optimizer

    config = base_config()
    # configs/tiny.py's model, as the run's own config.json records it
    config.model.update(json.loads((tmp_path / "run" / "config.json").read_text())["model"])
    assert (config.model.n_layers, config.model.d_model, config.model.n_ctx) == (2, 32, 32)
    cfg = model_config(config)
    _, abstract = init_state(Transformer(cfg, rngs=nnx.Rngs(0)), make_optimizer(optimizer_config(config)), 0)
    state, meta = checkpoints.restore(abstract, cfg)
    assert int(state.step) == summary["step"] == meta["step"]


def test_incompatible_and_corrupt_checkpoints_are_refused(corpus_slice, tmp_path):
    run(tiny_config(corpus_slice, tmp_path, steps=10), tmp_path / "run")
    bigger = tiny_config(corpus_slice, tmp_path, steps=20)
    bigger.model.n_layers = 3
    with pytest.raises(CheckpointError, match="made for a different model \\(n_layers: saved 2 vs now 3\\)"):
        run(bigger, tmp_path / "run")
    for file in (tmp_path / "run" / "checkpoints" / "10" / "state").rglob("*"):
        if file.is_file() and file.stat().st_size > 100:
            file.write_bytes(b"\0" * 64)
    with pytest.raises(CheckpointError, match="is corrupt: its arrays cannot be read"):
        run(tiny_config(corpus_slice, tmp_path, steps=20), tmp_path / "run")


@pytest.fixture(scope="module")
def single_device_run(corpus_slice, tmp_path_factory) -> Path:
    """train.py on one device, 12 steps: what the mesh and two-host runs must reproduce."""

    def train(tmp: Path) -> None:
        process = _train_process(_overrides(corpus_slice, tmp, steps=12, checkpoint_every=6), tmp / "run")
        _out, err = process.communicate(timeout=300)
        assert process.returncode == 0, err[-3000:]

    return shared_dir(tmp_path_factory, "single_device_run", train) / "run"


def _final_params(run_dir: Path) -> list[np.ndarray]:
    from flax import nnx

    from resstream import load_run

    model, _, _ = load_run(run_dir)
    return [np.asarray(x) for x in jax.tree.leaves(nnx.state(model, nnx.Param))]


@pytest.mark.slow
def test_a_run_on_an_8_device_mesh_matches_the_single_device_run(corpus_slice, single_device_run, tmp_path):
    """train.py under data x fsdp x tensor = 2 x 2 x 2 on 8 CPU devices logs the losses of the same
    run on one device."""
    overrides = _overrides(corpus_slice, tmp_path, steps=12, checkpoint_every=6)
    mesh = ["--config.mesh.data=2", "--config.mesh.fsdp=2", "--config.mesh.tensor=2"]
    env = xla_env(devices=8)
    command = [sys.executable, "train.py", "--config", "configs/tiny.py", f"--run_dir={tmp_path / 'eight'}"]
    eight = subprocess.run(
        [*command, *overrides, *mesh], cwd=ROOT, capture_output=True, text=True, env=env, timeout=300
    )
    assert eight.returncode == 0, eight.stderr[-3000:]
    one, many = losses(single_device_run), losses(tmp_path / "eight")
    assert [s for s, _ in many] == list(range(1, 13))
    np.testing.assert_allclose([x for _, x in many], [x for _, x in one], rtol=1e-5)
    bad = subprocess.run(
        [sys.executable, "train.py", "--config", "configs/tiny.py", f"--run_dir={tmp_path / 'bad'}", *overrides,
         "--config.mesh.data=3"], cwd=ROOT, capture_output=True, text=True, env=env, timeout=300,
    )  # fmt: skip
    assert bad.returncode == 1 and "mesh {'data': 3, 'fsdp': 1, 'tensor': 1} needs 3 devices" in bad.stderr


@pytest.mark.slow
def test_two_hosts_run_train_py_like_one(corpus_slice, single_device_run, tmp_path):
    """The multi-host path end to end: train.py with config.distributed=True as two real processes,
    joined by jax.distributed from the JAX_* variables over a loopback coordinator, one CPU device
    and half of every batch each. Host 0 logs the one-device run's losses, host 1 logs nothing, and
    the checkpoints the two write together (orbax, collectively) restore here, on one device, to
    the one-device run's parameters."""
    import socket

    with socket.socket() as s:  # a free port for the coordinator
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = xla_env(devices=None)  # one device per process
    command = [sys.executable, "train.py", "--config", "configs/tiny.py", f"--run_dir={tmp_path / 'two'}",
               *_overrides(corpus_slice, tmp_path, 12, 6), "--config.distributed=True"]  # fmt: skip
    hosts = [
        subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         env={**env, "JAX_COORDINATOR_ADDRESS": f"127.0.0.1:{port}", "JAX_NUM_PROCESSES": "2",
                              "JAX_PROCESS_ID": str(i)})
        for i in range(2)
    ]  # fmt: skip
    outputs = [host.communicate(timeout=300) for host in hosts]
    for host, (_, err) in zip(hosts, outputs, strict=True):
        assert host.returncode == 0, err[-3000:]
    summary = json.loads((tmp_path / "two" / "summary.json").read_text())
    assert summary["hosts"] == 2 and summary["step"] == 12
    one, two = losses(single_device_run), losses(tmp_path / "two")
    assert [s for s, _ in two] == list(range(1, 13))  # each step logged once: by host 0 alone
    np.testing.assert_allclose([x for _, x in two], [x for _, x in one], rtol=1e-5)
    assert Checkpoints(tmp_path / "two" / "checkpoints").all_steps() == [6, 12]
    expected, got = _final_params(single_device_run), _final_params(tmp_path / "two")
    scale = max(float(np.max(np.abs(x))) for x in expected)
    assert max(float(np.max(np.abs(a - b))) for a, b in zip(got, expected, strict=True)) < 1e-5 * scale
