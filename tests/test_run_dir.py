"""A run directory is never damaged: refused resumes change nothing, one process trains in it at a
time, corrupt checkpoints are refused (and the newest intact one offered), a finished run says so."""

import hashlib
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import shared_dir, tiny_config
from resstream.checkpoint import Checkpoints, CorruptCheckpointError, checksums
from resstream.config import ConfigError
from resstream.loop import DivergenceError, run
from resstream.run_lock import RunLock, RunLockedError
from resstream.runs import load_run
from resstream.telemetry import read_log


def snapshot(directory: Path) -> dict[str, str]:
    """Every file under `directory` (names and contents): what must not change."""
    return {
        str(p.relative_to(directory)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(directory.rglob("*"))
        if p.is_file()
    }


@pytest.fixture(scope="module")
def finished(corpus_slice, tmp_path_factory) -> tuple[Path, Path]:
    """(run directory, cache directory) of a finished 4-step run with checkpoints 2 and 4."""

    def train(tmp: Path) -> None:
        assert run(config(corpus_slice, tmp), tmp / "run")["status"] == "completed"

    tmp = shared_dir(tmp_path_factory, "finished", train)
    return tmp / "run", tmp


def config(corpus: Path, tmp: Path, **train):
    settings = dict(steps=4, checkpoint_every=2, eval_every=2, batch_size=4, sample_tokens=4)
    return tiny_config(corpus, tmp, **{**settings, **train})


@pytest.fixture
def copy(finished, tmp_path) -> Path:
    """A copy of the finished run that a test may change."""
    shutil.copytree(finished[0], tmp_path / "run")
    return tmp_path / "run"


def flip_bytes(checkpoint: Path) -> None:
    """16 bytes inverted in the middle of the largest array-data file: what a bad disk does."""
    data_file = max((checkpoint / "state").rglob("d/*"), key=lambda p: p.stat().st_size)
    data = bytearray(data_file.read_bytes())
    middle = len(data) // 2
    data[middle : middle + 16] = bytes(b ^ 0xFF for b in data[middle : middle + 16])
    data_file.write_bytes(data)


def test_a_refused_resume_changes_nothing(corpus_slice, finished, copy):
    before = snapshot(copy)
    bigger = config(corpus_slice, finished[1], steps=6)
    bigger.model.n_layers = 3
    with pytest.raises(Exception, match=r"made for a different model \(n_layers: saved 2 vs now 3\)"):
        run(bigger, copy)
    assert snapshot(copy) == before  # config.json included: sample and ablate still load the run
    model, tokenizer, loaded = load_run(copy)
    assert model.cfg.n_layers == loaded.model.n_layers == 2  # the saved model, not the refused one
    assert tokenizer.decode(tokenizer.encode("def f():")) == "def f():"


def test_a_finished_run_run_again_says_so_and_changes_nothing(corpus_slice, finished, copy, capsys):
    before = snapshot(copy)
    again = run(config(corpus_slice, finished[1]), copy)
    assert again["status"] == "already complete" and again["step"] == 4
    assert "already complete: its latest checkpoint is step 4 and train.steps=4" in capsys.readouterr().out
    assert snapshot(copy) == before


def test_a_second_process_is_refused_and_a_dead_ones_lock_does_not_block_the_resume(corpus_slice, finished, copy):
    holder = subprocess.Popen(
        [sys.executable, "-c", f"from resstream.run_lock import RunLock\nwith RunLock({str(copy)!r}):\n"
         "    print('locked', flush=True)\n    import time; time.sleep(600)"],
        stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert holder.stdout.readline().strip() == "locked"
        before = snapshot(copy)
        with pytest.raises(RunLockedError, match=rf"in use by another training process \(pid {holder.pid} on host "):
            run(config(corpus_slice, finished[1], steps=6), copy)
        assert snapshot(copy) == before
    finally:
        holder.send_signal(signal.SIGKILL)  # dies holding the lock; its lock file stays behind
        holder.wait()
    assert (copy / ".lock").exists()
    with (copy / "metrics.jsonl").open("a") as log:  # as if it crashed mid-write: a torn last line
        log.write('{"step": 5, "loss": 2.')
    more = run(config(corpus_slice, finished[1], steps=6), copy)  # steps raised: the run goes on
    assert more["status"] == "completed" and more["step"] == 6
    assert [r["step"] for r in read_log(copy) if "loss" in r] == [1, 2, 3, 4, 5, 6]
    assert not (copy / ".lock").exists()


def test_a_filesystem_without_locks_runs_unlocked_and_says_so(tmp_path, monkeypatch):
    import errno
    import fcntl
    import logging

    def no_flock(*_args):
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(fcntl, "flock", no_flock)
    notes = []
    handler = logging.Handler()
    handler.emit = lambda record: notes.append(record.getMessage())
    logging.getLogger("resstream").addHandler(handler)
    try:
        with RunLock(tmp_path):
            assert not (tmp_path / ".lock").exists()
    finally:
        logging.getLogger("resstream").removeHandler(handler)
    assert notes == [f"{tmp_path} cannot be locked (No locks available): nothing stops a second run there"]


def test_a_corrupt_checkpoint_is_refused_naming_the_newest_intact_one(corpus_slice, finished, copy):
    flip_bytes(copy / "checkpoints" / "4")
    before = snapshot(copy)
    with pytest.raises(CorruptCheckpointError) as refused:
        run(config(corpus_slice, finished[1], steps=6), copy)
    message = str(refused.value)
    assert re.search(
        rf"checkpoint 4 in {copy / 'checkpoints'} is corrupt: \d+ of its \d+ arrays differ from the "
        "checksums saved with them",
        message,
    ), message
    offer = "The newest intact checkpoint is step 2: run the same command with --config.train.resume_intact=True"
    assert offer in message
    assert snapshot(copy) == before
    with pytest.raises(CorruptCheckpointError, match="The newest intact checkpoint is step 2: load it with --step 2"):
        load_run(copy)
    load_run(copy, step=2)

    resumed = run(config(corpus_slice, finished[1], steps=6, resume_intact=True), copy)
    assert resumed["status"] == "completed" and resumed["step"] == 6
    assert (copy / "corrupt_checkpoints" / "4" / "state").is_dir()  # set aside, not deleted
    assert [r["step"] for r in read_log(copy) if "loss" in r] == [1, 2, 3, 4, 5, 6]


def test_a_checkpoint_from_before_a_model_field_existed_loads_and_resumes(corpus_slice, finished, copy):
    """A ModelConfig field added later (deepnorm, say) is absent from older checkpoints: they were
    made by the model the field's default describes, so they load and resume."""
    import json

    for meta in (copy / "checkpoints").glob("*/meta/metadata"):
        saved = json.loads(meta.read_text())
        del saved["model_config"]["deepnorm"]
        meta.write_text(json.dumps(saved))
    assert not load_run(copy)[0].cfg.deepnorm
    assert run(config(corpus_slice, finished[1], steps=6), copy)["step"] == 6


def test_unreadable_checkpoint_data_is_one_clear_error(corpus_slice, finished, copy, capfd):
    for data_file in (copy / "checkpoints" / "4" / "state").rglob("d/*"):
        data_file.write_bytes(b"\0" * 64)
    with pytest.raises(CorruptCheckpointError) as refused:
        run(config(corpus_slice, finished[1], steps=6), copy)
    message = str(refused.value)
    assert "checkpoint 4" in message and "is corrupt: its arrays cannot be read" in message
    assert "TensorStore" not in message and "\n" not in message and len(message) < 800
    assert refused.value.__cause__ is not None  # the root error is kept
    err = capfd.readouterr().err
    assert "Task exception was never retrieved" not in err and "Exception ignored" not in err


def test_checksums_see_a_single_changed_element_and_not_the_layout():
    import jax.numpy as jnp

    tree = {"w": jnp.arange(12, dtype=jnp.float32).reshape(3, 4), "b": jnp.ones(5, jnp.bfloat16), "s": jnp.int32(3)}
    base = checksums(tree)
    assert set(base) == {"['w']", "['b']", "['s']"}
    for leaf, changed in [("w", tree["w"].at[2, 3].add(1e-6)), ("b", tree["b"].at[0].set(-1)), ("s", jnp.int32(4))]:
        assert checksums({**tree, leaf: changed})[f"['{leaf}']"] != base[f"['{leaf}']"]
    swapped = tree["w"].at[0, 0].set(1.0).at[0, 1].set(0.0)  # the same values in other places
    assert checksums({**tree, "w": swapped})["['w']"] != base["['w']"]


def test_bad_settings_are_refused_before_anything_is_written(corpus_slice, tmp_path):
    small_vocab = config(corpus_slice, tmp_path)
    small_vocab.model.vocab_size = 100
    expected = r"model.vocab_size=100 is smaller than the tokenizer's vocabulary \(bytes: 256 tokens\)"
    with pytest.raises(ConfigError, match=expected):
        run(small_vocab, tmp_path / "new")
    assert not (tmp_path / "new").exists()
    (tmp_path / "a_file").write_text("not a directory")
    with pytest.raises(ConfigError, match="a_file is a file, not a directory"):
        run(config(corpus_slice, tmp_path), tmp_path / "a_file")


def test_a_failed_run_closes_what_it_opened(corpus_slice, tmp_path, corrupt_batch):
    corrupt_batch(3)
    with pytest.raises(DivergenceError):
        run(config(corpus_slice, tmp_path, steps=6), tmp_path / "run")
    assert not (tmp_path / "run" / ".lock").exists()
    with RunLock(tmp_path / "run"), Checkpoints(tmp_path / "run" / "checkpoints") as checkpoints:
        assert checkpoints.all_steps() == [2]  # an unreleased lock would raise RunLockedError here


def test_sample_draws_a_fresh_seed_each_call_and_says_which(finished, capsys, monkeypatch):
    """Two `sample` calls without --seed give different text; each prints its seed, and passing it
    back with --seed draws the same text again."""
    from resstream.cli import main

    seeds = iter([11, 22])
    monkeypatch.setattr("secrets.randbelow", lambda _: next(seeds))
    args = ["sample", str(finished[0]), "--tokens", "24", "--temperature", "1.0"]
    main(args)
    first = capsys.readouterr()
    main(args)
    second = capsys.readouterr()
    assert "note: seed 11 (pass --seed 11 to draw the same samples again)" in first.err
    assert "note: seed 22" in second.err and first.out != second.out
    main([*args, "--seed", "11"])
    again = capsys.readouterr()
    assert again.out == first.out and "note: seed" not in again.err
