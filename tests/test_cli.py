import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def run(*args: str, module: bool = False) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "resstream", *args] if module else [sys.executable, "train.py", *args]
    return subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=300)


def test_train_command_with_overrides_then_sample(tmp_path):
    result = run(
        "--config",
        "configs/tiny.py",
        f"--run_dir={tmp_path / 'run'}",
        "--config.train.steps=30",
        "--config.train.eval_every=15",
        "--config.train.checkpoint_every=15",
        "--config.train.progress=False",
        "--config.model.norm=rmsnorm",
        f"--config.data.cache_dir={tmp_path / 'cache'}",
    )
    assert result.returncode == 0, result.stderr
    assert '"status": "completed"' in result.stdout
    assert '"norm": "rmsnorm"' in (tmp_path / "run" / "config.json").read_text()
    sample = run(
        "sample", str(tmp_path / "run"), "--prompt", "import ", "--tokens", "20", "--temperature", "0", module=True
    )
    assert sample.returncode == 0, sample.stderr
    assert sample.stdout.startswith("import ")

    out = tmp_path / "ablation"
    study = run(
        "ablate", "--checkpoint", str(tmp_path / "run"), "--method", "mean", "--batch_size", "4", "--seq", "32",
        "--mean_batches", "2", "--deletion", "--draws", "2", "--patch", "--clean", "ab = a", "--corrupted", "ab = b",
        "--answer", "b", "--wrong", "a", "--out", str(out), module=True,
    )  # fmt: skip
    assert study.returncode == 0, study.stderr
    assert "mean ablation, baseline loss" in study.stdout and "layer deletion" in study.stdout
    sweep = json.loads((out / "sweep.json").read_text())
    assert [r["component"] for r in sweep["rows"]] == ["0_attn_out", "0_mlp_out", "1_attn_out", "1_mlp_out"]
    assert len((out / "sweep.csv").read_text().splitlines()) == 5
    deletion = json.loads((out / "deletion_run.json").read_text())
    assert [r["k"] for r in deletion["rows"]] == [0, 1, 1, 2]
    patching = json.loads((out / "patching.json").read_text())
    assert len(patching["rows"]) == 2 * len("ab = a")
    for picture in ("sweep.png", "deletion.png", "patching.png"):
        assert (out / picture).read_bytes()[:4] == b"\x89PNG"
    unknown = run("ablate", "--checkpoint", str(tmp_path / "run"), "--granularity", "neurons", module=True)
    assert unknown.returncode != 0 and "invalid choice: 'neurons'" in unknown.stderr


def test_bad_config_and_overrides_are_reported(tmp_path):
    missing = run("--config", "configs/missing.py")
    assert missing.returncode != 0 and "configs/missing.py" in missing.stderr
    unknown = run("--config", "configs/tiny.py", "--config.model.n_layer=3")
    assert unknown.returncode != 0 and "n_layer" in unknown.stderr
    invalid = run("--config", "configs/tiny.py", "--config.model.norm=batchnorm", f"--run_dir={tmp_path / 'a'}")
    assert invalid.returncode == 1 and "error: norm='batchnorm' is not supported" in invalid.stderr
    no_data = run(
        "--config", "configs/tiny.py", "--config.data.source=nowhere/corpus.txt", f"--run_dir={tmp_path / 'b'}"
    )
    assert no_data.returncode == 1 and "error: data file nowhere/corpus.txt not found" in no_data.stderr
    not_a_run = run("sample", str(tmp_path), module=True)
    assert not_a_run.returncode != 0 and "is not a run directory" in not_a_run.stderr
