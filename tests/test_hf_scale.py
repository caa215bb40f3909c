"""resstream.hf at the sizes users work at: a GPT-2-small-shaped checkpoint (random weights, written
by transformers) loads and is analysed within the memory budget of the real-scale work; a model
trained by train.py round-trips through hf.save into transformers."""

from pathlib import Path

import jax
import numpy as np
import pytest
from tokenizers import Tokenizer, models, pre_tokenizers, trainers

from conftest import max_rel_err, tiny_config
from resstream import analysis, hf
from resstream.ablation import ablate, ablation_sweep
from resstream.loop import run
from resstream.runs import load_run

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

BUDGET = 8 << 30  # benchmarks/memory.py's budget for GPT-2-small-sized work (a consumer GPU)


def _small_tokenizer(directory: Path) -> None:
    """A byte-level BPE of 300 tokens as directory/tokenizer.json (the model's vocabulary is larger)."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(vocab_size=300, initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator(["the cat sat on the mat and the dog sat on the log"] * 20, trainer)
    tokenizer.save(str(directory / "tokenizer.json"))


@pytest.mark.slow
def test_a_gpt2_small_checkpoint_loads_and_is_analysed_within_the_real_scale_budget(tmp_path):
    torch.manual_seed(0)
    reference = transformers.GPT2LMHeadModel(transformers.GPT2Config()).eval()  # 124M parameters, 12 x 768
    reference.save_pretrained(tmp_path)
    _small_tokenizer(tmp_path)
    model, tokenizer = hf.load(tmp_path)
    cfg = model.cfg
    assert (cfg.n_layers, cfg.d_model, cfg.n_heads, cfg.vocab_size, cfg.n_ctx) == (12, 768, 12, 50257, 1024)
    assert cfg.tied_embeddings and model.b_U is None

    ids = np.asarray(tokenizer.encode("the cat sat on the mat and the dog sat on the log"), np.int32)[None]
    logits, cache = model.run_with_cache(ids, memory_budget=BUDGET)
    with torch.no_grad():
        expected = reference(torch.tensor(ids, dtype=torch.long)).logits.numpy()
    assert max_rel_err(logits, expected) < 1e-4

    parts = analysis.decompose_logits(model, cache, split_heads=True, pos=-1, memory_budget=BUDGET)
    assert len(parts) == 12 * 13 + 12 + 2 + 1  # heads and b_O per layer, MLPs, embed, pos_embed, bias
    assert max_rel_err(parts.sum(), logits[:, -1]) < 1e-4

    sweep = ablation_sweep(model, ids, "heads", memory_budget=BUDGET)
    assert sweep.labels[0] == "L0H0" and len(sweep.labels) == 144
    one = [3, 77, 143]  # spot checks of rows against single ablations
    single = [float(ablate(model, ids, [sweep.labels[i]]).loss) for i in one]
    assert max_rel_err(np.asarray(sweep.loss)[one], single) < 1e-5
    assert np.all(np.isfinite(np.asarray(sweep.total))) and float(np.max(np.abs(sweep.total))) > 0


@pytest.mark.slow
def test_a_model_trained_by_train_py_round_trips_through_hf_save_into_transformers(corpus_slice, tmp_path):
    # configs/tiny.py's model (GPT-2's architecture: learned positions, pre-LN LayerNorm, tanh GELU, no b_U)
    config = tiny_config(corpus_slice, tmp_path, steps=10, eval_every=10, checkpoint_every=10, sample_tokens=0)
    config.model.update(unembed_bias=False)
    assert run(config, tmp_path / "run")["status"] == "completed"
    model, tokenizer, _ = load_run(tmp_path / "run")
    hf.save(model, tokenizer, tmp_path / "export")

    exported = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "export").eval()
    assert type(exported).__name__ == "GPT2LMHeadModel"
    text = "def f(x):\n    return x + 1  # é"
    ids = tokenizer.encode(text)
    hf_tokenizer = transformers.AutoTokenizer.from_pretrained(tmp_path / "export")
    assert hf_tokenizer(text, add_special_tokens=False)["input_ids"] == ids.tolist()
    assert hf_tokenizer.decode(ids) == text
    with torch.no_grad():
        expected = exported(torch.tensor(ids[None], dtype=torch.long)).logits.numpy()
    logits = np.asarray(model(jax.numpy.asarray(ids[None], jax.numpy.int32)))
    assert max_rel_err(logits, expected) < 1e-4

    reloaded, _ = hf.load(tmp_path / "export")
    assert np.array_equal(np.asarray(reloaded(ids[None].astype(np.int32))), logits)
