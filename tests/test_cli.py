import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "train.py", *args], cwd=ROOT, capture_output=True, text=True, timeout=300)


def test_train_command_runs_the_pipeline_on_stdlib_text():
    result = run("--config", "configs/tiny.py", "--batch", "2", "norm_placement=post")
    assert result.returncode == 0, result.stderr
    assert "RANDOM weights" in result.stdout
    error = float(result.stdout.split("max relative error ")[1].split(")")[0])
    assert error < 1e-4
    assert "lens final" in result.stdout


def test_bad_config_and_overrides_are_reported():
    assert "config file configs/missing.py not found" in run("--config", "configs/missing.py").stderr
    assert "FIELD one of" in run("--config", "configs/tiny.py", "n_layer=3").stderr
    assert "n_layers takes an integer" in run("--config", "configs/tiny.py", "n_layers=three").stderr
    assert "invalid config: norm='batchnorm'" in run("--config", "configs/tiny.py", "norm=batchnorm").stderr
