"""The presets in configs/: each loads through train.py's command line and gives a valid model and
optimizer; configs/gpt2_small.py holds GPT-2 small's shape and training recipe, and a copy of it
shrunk in size only (everything else kept: bf16, remat, BPE, schedule, optimizer) trains through the
run loop on CPU."""

import json
import math
from pathlib import Path

import pytest

from resstream.config import model_config, optimizer_config
from resstream.config_file import parse_train_args
from resstream.loop import run
from resstream.telemetry import read_log
from resstream.tokenizer import TOKENIZER_FILE, BPETokenizer, check_vocab

ROOT = Path(__file__).resolve().parent.parent
PRESETS = sorted((ROOT / "configs").glob("*.py"))
GPT2_SMALL = ROOT / "configs" / "gpt2_small.py"


@pytest.fixture(autouse=True)
def repository_on_path(monkeypatch):
    """train.py runs from the repository root, where a preset can import another
    (configs/deletion_plain.py imports configs/deletion_residual.py)."""
    monkeypatch.syspath_prepend(str(ROOT))


def load(path: Path, *overrides: str):
    """(config, run_dir) as `python train.py --config PATH OVERRIDES...` reads them."""
    return parse_train_args(["train.py", f"--config={path}", *overrides])


def flat(tree: dict, prefix: str = "") -> dict:
    """{"section.field": value} of a (nested) config dict."""
    out = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out.update(flat(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


@pytest.mark.parametrize("path", PRESETS, ids=lambda p: p.stem)
def test_every_preset_loads_and_validates(path):
    config, run_dir = load(path)
    cfg, opt = model_config(config), optimizer_config(config)  # ConfigError for an invalid one
    check_vocab(config.data.tokenizer, cfg.vocab_size)  # the tokenizer is valid and fits the model
    assert run_dir == f"runs/{path.stem}"  # no two presets write to the same directory
    assert opt.total_steps == config.train.steps and 0 <= opt.warmup_steps < opt.total_steps
    assert config.train.batch_size >= 1 and config.train.grad_accum >= 1


def test_gpt2_small_is_gpt2_small_trained_as_build_nanogpt_trains_it():
    config, _ = load(GPT2_SMALL)
    cfg, opt, tc = model_config(config), optimizer_config(config), config.train
    assert (cfg.n_layers, cfg.d_model, cfg.n_heads, cfg.d_head, cfg.d_mlp, cfg.n_ctx) == (12, 768, 12, 64, 3072, 1024)
    assert (cfg.norm, cfg.norm_placement, cfg.positions, cfg.mlp) == ("layernorm", "pre", "learned", "gelu")
    assert cfg.tied_embeddings and cfg.residual and not cfg.attn_only and cfg.dropout == 0 == cfg.stochastic_depth
    assert (cfg.dtype, cfg.param_dtype, cfg.remat) == ("bfloat16", "float32", "dots")
    assert config.data.tokenizer == f"bpe:{cfg.vocab_size}" and cfg.vocab_size % 64 == 0
    assert tc.batch_size * tc.grad_accum * cfg.n_ctx == 2**19  # ~0.5M tokens per step
    assert tc.steps == 19_073 and tc.steps * 2**19 == pytest.approx(10e9, rel=1e-4)  # 10B tokens
    assert (opt.learning_rate, opt.warmup_steps, opt.min_lr_ratio) == (6e-4, 715, 0.1)
    assert (opt.b1, opt.b2, opt.weight_decay, opt.grad_clip) == (0.9, 0.95, 0.1, 1.0)


# Sizes only: the shape, the vocabulary (and the BPE's N with it), the data, the number of steps, the
# batch, and how much is evaluated, checkpointed and sampled.
SHRUNK = {
    "model.n_layers": 2,
    "model.d_model": 64,
    "model.n_heads": 2,
    "model.n_ctx": 64,
    "model.vocab_size": 320,
    "data.tokenizer": "bpe:320",
    "train.steps": 2,
    "train.batch_size": 4,
    "train.grad_accum": 2,
    "train.log_every": 1,
    "train.eval_every": 2,
    "train.eval_batches": 1,
    "train.checkpoint_every": 2,
    "train.sample_tokens": 8,
}


def test_a_shrunk_gpt2_small_trains_through_the_run_loop(corpus_slice, tmp_path):
    data = {"data.source": str(corpus_slice), "data.cache_dir": str(tmp_path / "cache")}
    overrides = {**SHRUNK, **data}
    config, run_dir = load(
        GPT2_SMALL, *[f"--config.{k}={v}" for k, v in overrides.items()], f"--run_dir={tmp_path / 'run'}"
    )
    preset, _ = load(GPT2_SMALL)
    summary = run(config, run_dir)

    assert summary["status"] == "completed" and summary["step"] == 2
    assert math.isfinite(summary["val_loss"]) and math.isfinite(summary["val_bits_per_byte"])
    records = [r for r in read_log(run_dir) if "loss" in r]
    assert [r["step"] for r in records] == [1, 2] and all(math.isfinite(r["loss"]) for r in records)
    # the preset's schedule: linear warmup from 0 over its warmup_steps, whatever train.steps is
    peak, warmup = preset.optimizer.learning_rate, preset.optimizer.warmup_steps
    assert [r["lr"] for r in records] == pytest.approx([0.0, peak / warmup], rel=1e-3)  # float32
    tokenizer = BPETokenizer.load(Path(run_dir) / TOKENIZER_FILE)
    assert 256 < tokenizer.vocab_size <= 320
    # The run used the preset in every field but the sizes (config.json is what the run saved).
    used, original = flat(json.loads((Path(run_dir) / "config.json").read_text())), flat(preset.to_dict())
    changed = {k for k in original if used[k] != original[k]}
    assert changed == set(overrides), changed
    assert (used["model.dtype"], used["model.remat"], used["model.tied_embeddings"]) == ("bfloat16", "dots", True)
