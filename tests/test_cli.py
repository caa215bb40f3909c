import json
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import xla_env
from resstream.cli import main, train_main
from resstream.data import ByteTokenizer
from resstream.runs import load_run
from resstream.sampling import generate

ROOT = Path(__file__).resolve().parent.parent


def run(*args: str) -> subprocess.CompletedProcess:
    """train.py as a user runs it, from the shell (on the CPU, as everywhere: `xla_env`)."""
    return subprocess.run(
        [sys.executable, "train.py", *args], cwd=ROOT, capture_output=True, text=True, timeout=300, env=xla_env()
    )


@pytest.mark.slow
def test_train_command_with_overrides_then_sample(corpus_slice, tmp_path, capsys):
    result = run(
        "--config",
        "configs/tiny.py",
        f"--run_dir={tmp_path / 'run'}",
        "--config.train.steps=30",
        "--config.train.eval_every=15",
        "--config.train.checkpoint_every=15",
        "--config.train.progress=False",
        "--config.model.norm=rmsnorm",
        f"--config.data.source={corpus_slice}",
        f"--config.data.cache_dir={tmp_path / 'cache'}",
    )
    assert result.returncode == 0, result.stderr
    assert '"status": "completed"' in result.stdout
    assert '"norm": "rmsnorm"' in (tmp_path / "run" / "config.json").read_text()
    capsys.readouterr()
    main(["sample", str(tmp_path / "run"), "--prompt", "import ", "--tokens", "20", "--temperature", "0"])
    printed = capsys.readouterr().out
    # What it printed is the greedy continuation: each new byte the argmax of the trained model's
    # logits given everything before it (one causal forward pass over the whole sample).
    model, _, _ = load_run(tmp_path / "run")
    ids = generate(model, ByteTokenizer().encode("import ")[None], 20, temperature=0)[0]
    assert printed == ByteTokenizer().decode(ids) + "\n" + "-" * 40 + "\n"
    logits = np.asarray(model(jnp.asarray(ids[None, :-1])))[0, len("import ") - 1 :]  # predicting ids[7:]
    chosen = logits[np.arange(20), ids[len("import ") :]]
    np.testing.assert_allclose(chosen, logits.max(-1), rtol=0, atol=1e-5)

    out = tmp_path / "ablation"
    main([
        "ablate", "--checkpoint", str(tmp_path / "run"), "--method", "mean", "--batch_size", "4", "--seq", "32",
        "--mean_batches", "2", "--deletion", "--draws", "2", "--patch", "--clean", "ab = a", "--corrupted", "ab = b",
        "--answer", "b", "--wrong", "a", "--out", str(out),
    ])  # fmt: skip
    study = capsys.readouterr().out
    assert "mean ablation, baseline loss" in study and "layer deletion" in study
    sweep = json.loads((out / "sweep.json").read_text())
    assert [r["component"] for r in sweep["rows"]] == ["0_attn_out", "0_mlp_out", "1_attn_out", "1_mlp_out"]
    assert len((out / "sweep.csv").read_text().splitlines()) == 5
    deletion = json.loads((out / "deletion_run.json").read_text())
    assert [r["k"] for r in deletion["rows"]] == [0, 1, 1, 2]
    patching = json.loads((out / "patching.json").read_text())
    assert len(patching["rows"]) == 2 * len("ab = a")
    for picture in ("sweep.png", "deletion.png", "patching.png"):
        assert (out / picture).read_bytes()[:4] == b"\x89PNG"
    with pytest.raises(SystemExit) as unknown:
        main(["ablate", "--checkpoint", str(tmp_path / "run"), "--granularity", "neurons"])
    assert unknown.value.code == 2 and "invalid choice: 'neurons'" in capsys.readouterr().err


def test_train_py_help_and_a_typo_from_the_shell():
    help_text = run("--help")
    assert help_text.returncode == 0 and "--config.train.steps=1600" in help_text.stdout
    assert "--config.model.n_layers=4" in help_text.stdout and "--run_dir DIR" in help_text.stdout
    typo = run("--config", "configs/tiny.py", "--config.model.n_layer=3")
    assert typo.returncode == 2 and "Traceback" not in typo.stderr
    assert typo.stderr.splitlines()[0] == (
        "error: --config.model.n_layer: model has no field 'n_layer' in configs/tiny.py (did you mean \"n_layers\"?)"
    )


def train_error(capsys, *args: str, code: int = 2) -> str:
    """The one `error:` line that train.py prints for a mistake on its command line."""
    with pytest.raises(SystemExit) as exited:
        train_main(["train.py", *args])
    assert exited.value.code == code
    err = capsys.readouterr().err
    assert "Traceback" not in err and err.startswith("error: ") and len(err.strip().splitlines()) <= 2, err
    return err.splitlines()[0]


def test_train_command_line_mistakes_are_one_line_each(tmp_path, capsys):
    tiny = str(ROOT / "configs" / "tiny.py")
    missing = str(ROOT / "configs" / "missing.py")
    assert train_error(capsys, "--config", missing) == (
        f"error: config file {missing} not found: pass an existing file, such as configs/default.py"
    )
    broken = tmp_path / "broken.py"
    broken.write_text("def get_config(:\n    pass\n")
    assert train_error(capsys, f"--config={broken}").startswith(f"error: config file {broken} line 1: ")
    assert train_error(capsys, "--config", tiny, "--config.trian.steps=3") == (
        f"error: --config.trian.steps: the config has no field 'trian' in {tiny} (did you mean \"train\"?)"
    )
    default = str(ROOT / "configs" / "default.py")  # no --config: the one override is the whole command line
    assert train_error(capsys, "--config.train.stepz=3") == (
        f"error: --config.train.stepz: train has no field 'stepz' in {default} (did you mean \"steps\"?)"
    )
    assert "--config.train.steps=abc: invalid literal for int()" in train_error(
        capsys, "--config", tiny, "--config.train.steps=abc"
    )
    assert "unexpected arguments ['steps=3']" in train_error(capsys, "--config", tiny, "steps=3")
    invalid = train_error(capsys, "--config", tiny, "--config.model.norm=batchnorm", code=1)
    assert invalid.startswith("error: norm='batchnorm' is not supported")
    (tmp_path / "a_file").write_text("")
    assert train_error(capsys, "--config", tiny, f"--run_dir={tmp_path / 'a_file'}", code=1) == (
        f"error: --run_dir {tmp_path / 'a_file'} is a file, not a directory: name a directory (it is created if "
        "missing)"
    )
    no_data = train_error(capsys, "--config", tiny, "--config.data.source=nowhere/corpus.txt", code=1)
    assert no_data.startswith("error: data file nowhere/corpus.txt not found")


def test_sample_options_are_checked_before_anything_is_loaded(tmp_path, capsys):
    (tmp_path / "config.json").write_text(json.dumps({"model": {"vocab_size": 256}}))
    for args, message in [
        (["--temperature", "-1"], "temperature must be 0 (greedy) or positive, got -1.0"),
        (["--top_k", "0"], "top_k must be between 1 and the vocabulary size 256, got 0"),
        (["--top_k", "257"], "top_k must be between 1 and the vocabulary size 256, got 257"),
        (["--prompt", ""], "--prompt is empty: give at least one character for the model to continue"),
        (["--num_samples", "0"], "--num_samples must be at least 1, got 0"),
        (["--tokens", "-5"], "tokens to generate must be 0 or more, got -5"),
    ]:
        with pytest.raises(SystemExit) as exited:
            main(["sample", str(tmp_path), *args])
        err = capsys.readouterr().err
        assert exited.value.code == 2 and f"error: {message}" in err, err
    with pytest.raises(SystemExit) as exited:
        main(["sample", str(tmp_path / "nothing")])
    assert exited.value.code == 2 and "nothing is not a run directory (no config.json)" in capsys.readouterr().err


def test_importing_and_plotting_change_no_global_state(tmp_path):
    """A notebook user's logging and matplotlib backend are theirs: resstream sets neither."""
    script = f"""
import logging, sys
import matplotlib
def backend():  # the setting as it stands (matplotlib.get_backend() would itself resolve it, via pyplot)
    return dict.__getitem__(matplotlib.rcParams, "backend")
before, absl_level = backend(), logging.getLogger("absl").level
import resstream, resstream.checkpoint, resstream.cli, resstream.loop, resstream.study_report, resstream.telemetry
from resstream.telemetry import MetricsLog, plot_run
log = MetricsLog({str(tmp_path)!r}, tensorboard=False)
log.write({{"step": 1, "loss": 2.0, "layer_resid_pre_norm": [1.0, 2.0], "layer_grad_norm": [0.1, 0.2]}})
assert [p.name for p in plot_run({str(tmp_path)!r})] == ["loss.png", "stream.png", "gradients.png"]
assert backend() == before, (backend(), before)
assert logging.getLogger("absl").level == absl_level
assert "matplotlib.pyplot" not in sys.modules
"""
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120, env=xla_env())
    assert result.returncode == 0, result.stderr[-3000:]


def test_commands_take_a_hugging_face_model_directory(tmp_path, capsys, monkeypatch):
    from flax import nnx

    from conftest import randomize
    from resstream import ModelConfig, Transformer, analysis, hf

    cfg = ModelConfig(vocab_size=256, n_layers=2, d_model=32, n_heads=4, n_ctx=32, unembed_bias=False)
    model = randomize(Transformer(cfg, rngs=nnx.Rngs(0)), scale=0.5)
    hf.save(model, ByteTokenizer(), tmp_path / "gpt2")
    monkeypatch.chdir(tmp_path)  # the token cache of `ablate` goes under ./runs
    prompt = "def f(x):\n    return x"

    main(["analyse", str(tmp_path / "gpt2"), "--prompt", prompt, "--out", str(tmp_path / "analysis")])
    printed = capsys.readouterr().out
    result = json.loads((tmp_path / "analysis" / "analysis.json").read_text())
    assert (tmp_path / "analysis" / "analysis.png").read_bytes()[:4] == b"\x89PNG"
    ids = ByteTokenizer().encode(prompt)[None].astype(np.int32)
    logits, cache = model.run_with_cache(ids)
    predicted = int(np.argmax(logits[0, -1]))
    assert result["next_tokens"][0][0] == ByteTokenizer().token_label(predicted) and "next token:" in printed
    dla = dict(result["dla"])  # every component (heads split), summing to the predicted token's logit
    expected = analysis.logit_attrs(model, cache, [predicted], split_heads=True, pos=-1)
    assert set(dla) == set(expected.labels) and abs(sum(dla.values()) - float(logits[0, -1, predicted])) < 1e-4
    assert [row[0] for row in result["lens"]][-1] == "final"
    assert abs(result["lens"][-1][1] - float(jnp.max(jax.nn.softmax(logits[0, -1])))) < 1e-5
    assert np.asarray(result["heads"]).shape == (2, 4)

    main(["sample", str(tmp_path / "gpt2"), "--prompt", "ab", "--tokens", "5", "--temperature", "0", "--seed", "0"])
    greedy = generate(model, ByteTokenizer().encode("ab")[None], 5, temperature=0)[0]
    assert capsys.readouterr().out.startswith(ByteTokenizer().decode(greedy) + "\n")

    out = tmp_path / "ablation"
    main(["ablate", "--checkpoint", str(tmp_path / "gpt2"), "--batch_size", "2", "--seq", "16", "--out", str(out)])
    # on the built-in corpus's validation split, in the model's own tokenizer
    sweep = json.loads((out / "sweep.json").read_text())
    assert [r["component"] for r in sweep["rows"]] == ["0_attn_out", "0_mlp_out", "1_attn_out", "1_mlp_out"]

    with pytest.raises(SystemExit) as refused:
        main(["sample", str(tmp_path / "gpt2"), "--step", "3"])
    assert refused.value.code == 1 and "holds one checkpoint" in capsys.readouterr().err
