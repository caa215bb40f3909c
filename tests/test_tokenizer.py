"""Tokenizers: the byte-level BPE (training, round trips, files), data.tokenizer's validation, token
caches keyed by the tokenizer, and a BPE run end to end (resume, sample, ablate, load_run)."""

import hashlib
import json
import math
import os
import re
import signal
from pathlib import Path

import numpy as np
import pytest
from tokenizers import Tokenizer, models, pre_tokenizers

from conftest import tiny_config
from resstream.config import ConfigError, base_config
from resstream.data import (
    BYTES_FINGERPRINT,
    ByteTokenizer,
    _fingerprint,
    corpus_counts,
    split_counts,
    tokenized_corpus,
)
from resstream.tokenizer import (
    TOKENIZER_FILE,
    BPETokenizer,
    check_vocab,
    load_tokenizer,
    parse_tokenizer,
    tokenizer_for,
    train_bpe,
    unicode_to_byte,
)

ROOT = Path(__file__).resolve().parent.parent
TRICKY = ["def f(x):\n    return  x\t\r\n", "naïve café — 日本語 😀", "\x00\x7f trailing spaces   ", ""]


@pytest.fixture(scope="module")
def source_text() -> str:
    """~100 kB of real text (this project's sources)."""
    return "".join(p.read_text() for p in sorted((ROOT / "resstream").glob("*.py"))[:12])


@pytest.fixture(scope="module")
def bpe(source_text) -> BPETokenizer:
    return train_bpe([source_text[i : i + 2000] for i in range(0, len(source_text), 2000)], 400)


def test_bpe_round_trips_any_text_and_saves_and_loads_equal(bpe, source_text, tmp_path):
    assert 256 < bpe.vocab_size <= 400 and bpe.dtype == np.uint16
    assert set(unicode_to_byte()) == set(pre_tokenizers.ByteLevel.alphabet())  # our map is the library's
    for text in TRICKY:
        ids = bpe.encode(text)
        assert ids.dtype == np.uint16 and bpe.decode(ids) == text
    batch = bpe.encode_batch(TRICKY)
    assert [b.tolist() for b in batch] == [bpe.encode(t).tolist() for t in TRICKY]
    assert len(bpe.encode(source_text[:5000])) < 0.6 * 5000  # merges were learnt
    bpe.save(tmp_path / TOKENIZER_FILE)
    assert [p.name for p in tmp_path.iterdir()] == [TOKENIZER_FILE]  # no partial file left
    loaded = BPETokenizer.load(tmp_path / TOKENIZER_FILE)
    assert loaded == bpe and loaded.fingerprint == bpe.fingerprint and loaded.vocab_size == bpe.vocab_size
    assert all(np.array_equal(loaded.encode(t), bpe.encode(t)) for t in TRICKY)
    assert load_tokenizer(tmp_path) == bpe and isinstance(load_tokenizer(tmp_path / "nothing"), ByteTokenizer)


def test_token_labels_are_text_and_never_invisible(bpe):
    word = next(t for t in range(bpe.vocab_size) if re.fullmatch(r" [a-z]{3,}", bpe.token_text(t)))
    assert bpe.token_label(word) == repr(bpe.token_text(word))  # e.g. "' self'": the space shows
    assert [bpe.token_label(t) for t in bpe.encode("\t\n")] in (["'\\t\\n'"], ["'\\t'", "'\\n'"])
    first, *_ = bpe.encode("😀")  # a piece of a character: its bytes
    assert bpe.token_label(first) == "b'\\xf0'"
    byte = ByteTokenizer()
    assert byte.token_label(32) == "' '" and byte.token_label(10) == "'\\n'" and byte.token_label(0xE2) == "b'\\xe2'"
    assert byte.token_text(ord("a")) == "a"
    assert [ids.tolist() for ids in byte.encode_batch(["ab", ""])] == [[97, 98], []]


def test_dtype_follows_the_vocabulary_size():
    big = Tokenizer(models.BPE(vocab={f"t{i}": i for i in range(70_000)}, merges=[]))
    assert BPETokenizer(big).dtype == np.uint32 and ByteTokenizer.dtype == np.uint8


def test_data_tokenizer_is_validated_with_a_fix(tmp_path, bpe):
    assert base_config().data.tokenizer == "bytes"
    assert parse_tokenizer("bytes") == ("bytes", None) and parse_tokenizer("bpe:4096") == ("bpe", 4096)
    for bad in ("bpe:abc", "bpe:256", "bpe:0", "bpe:-5", "bpe:"):
        with pytest.raises(ConfigError, match=r"N must be an integer from 257 .* --config.data.tokenizer=bpe:4096"):
            parse_tokenizer(bad)
    with pytest.raises(ConfigError, match=r"neither a tokenizer name nor an existing file: use \"bytes\""):
        parse_tokenizer(str(tmp_path / "missing.json"))
    (tmp_path / "broken.json").write_text("{not json")
    with pytest.raises(ConfigError, match=r"broken.json is not a tokenizer.json that HuggingFace tokenizers can"):
        check_vocab(str(tmp_path / "broken.json"), 1000)
    with pytest.raises(ConfigError, match=re.escape("(bytes: 256 tokens)") + ".*vocab_size=256"):
        check_vocab("bytes", 100)
    with pytest.raises(ConfigError, match=r"\(bpe:512: 512 tokens\).*vocab_size=512, or a smaller N .*bpe:300"):
        check_vocab("bpe:512", 300)
    bpe.save(tmp_path / "tok.json")
    with pytest.raises(ConfigError, match=rf"vocab_size={bpe.vocab_size}"):
        check_vocab(str(tmp_path / "tok.json"), 256)
    check_vocab(str(tmp_path / "tok.json"), bpe.vocab_size)
    check_vocab("bpe:512", 512)


def test_token_caches_are_keyed_by_the_tokenizer(tmp_path, source_text):
    source = tmp_path / "corpus.txt"
    source.write_text(source_text)
    bytes_tokens = tokenized_corpus(str(source), "train", tmp_path / "cache")
    # bytes keep the cache name they had before tokenizers were configurable
    digest = hashlib.sha256(f"{source}|train|text|0.05|bytes-v2".encode())
    digest.update(f"{source}|{source.stat().st_size}|{source.stat().st_mtime_ns}".encode())
    assert _fingerprint(str(source), "train", "text", 0.05) == digest.hexdigest()[:16]
    assert [p.name for p in (tmp_path / "cache").iterdir()] == [f"tokens-train-{digest.hexdigest()[:16]}.bin"]
    assert ByteTokenizer.fingerprint == BYTES_FINGERPRINT

    small, large = train_bpe([source_text], 300), train_bpe([source_text], 500)
    cached = [tokenized_corpus(str(source), "train", tmp_path / "cache", tokenizer=t) for t in (small, large)]
    names = sorted(p.name for p in (tmp_path / "cache").iterdir())
    assert len(names) == 5 and sum(n.endswith(".json") for n in names) == 2  # a .bin and counts per BPE
    n_bytes = len(bytes_tokens)
    for tokenizer, tokens in zip((small, large), cached, strict=True):
        assert tokens.dtype == np.uint16 and len(tokens) < n_bytes
        assert corpus_counts(str(source), "train", tmp_path / "cache", tokenizer=tokenizer) == (len(tokens), n_bytes)
    assert len(cached[1]) < len(cached[0])
    assert corpus_counts(str(source), "train", tmp_path / "cache") == (n_bytes, n_bytes)
    assert small.decode(cached[0]) == bytes(np.asarray(bytes_tokens)).decode()


def test_bpe_is_trained_once_and_a_run_keeps_its_own(tmp_path, source_text):
    source = tmp_path / "corpus.txt"
    source.write_text(source_text)
    config = base_config()
    config.data.update(source=str(source), cache_dir=str(tmp_path / "cache"), tokenizer="bpe:300")
    trained = tokenizer_for(config, tmp_path / "run")
    assert isinstance(trained, BPETokenizer) and not (tmp_path / "run").exists()  # nothing written in run_dir
    assert [p.name for p in (tmp_path / "cache").glob("tokenizer-bpe300-*.json")]  # kept for the next run
    assert tokenizer_for(config, tmp_path / "other") == trained

    run_dir = tmp_path / "run"
    run_dir.mkdir()
    theirs = train_bpe(["something else entirely"], 300)
    theirs.save(run_dir / TOKENIZER_FILE)
    (run_dir / "config.json").write_text(json.dumps({"data": {"tokenizer": "bpe:300"}}))
    assert tokenizer_for(config, run_dir) == theirs  # a resumed run's own tokenizer, not a retrained one
    config.data.tokenizer = str(run_dir / TOKENIZER_FILE)
    assert tokenizer_for(config, run_dir) == theirs  # the same tokenizer named by its path
    for other in ("bytes", "bpe:400"):
        config.data.tokenizer = other
        with pytest.raises(ConfigError, match=r"trained with data.tokenizer='bpe:300', not .*tokenizer=bpe:300"):
            tokenizer_for(config, run_dir)
    (run_dir / "config.json").write_text(json.dumps({"data": {}}))  # a byte-level run from before
    config.data.tokenizer = "bpe:300"
    with pytest.raises(ConfigError, match=re.escape("trained with data.tokenizer='bytes', not 'bpe:300'")):
        tokenizer_for(config, run_dir)


def losses(run_dir: Path) -> list[tuple]:
    from resstream.telemetry import read_log

    return [(r["step"], r.get("loss"), r.get("val_loss"), r.get("val_bits_per_byte")) for r in read_log(run_dir)]


@pytest.mark.slow
def test_a_bpe_run_resumes_exactly_samples_and_ablates_in_its_tokens(corpus_slice, tmp_path, monkeypatch, capsys):
    import jax
    from flax import nnx

    from resstream.cli import main
    from resstream.data import Sampler
    from resstream.loop import run
    from resstream.runs import load_run
    from resstream.sampling import generate
    from resstream.telemetry import read_log

    config = tiny_config(corpus_slice, tmp_path, steps=8, checkpoint_every=4, eval_every=4, batch_size=4)
    config.model.vocab_size = 512
    config.data.tokenizer = "bpe:512"
    straight = run(config, tmp_path / "straight")
    assert straight["status"] == "completed"

    draw, calls = Sampler.next_batch, iter(range(100))

    def stop_in_step_3(self, rows):
        if next(calls) == 2:
            os.kill(os.getpid(), signal.SIGTERM)  # the loop stops after this step and checkpoints it
        return draw(self, rows)

    monkeypatch.setattr(Sampler, "next_batch", stop_in_step_3)
    assert run(config, tmp_path / "resumed")["status"] == "stopped by signal SIGTERM after step 3"
    monkeypatch.setattr(Sampler, "next_batch", draw)
    resumed = run(config, tmp_path / "resumed")
    capsys.readouterr()
    assert resumed == straight
    assert losses(tmp_path / "resumed") == losses(tmp_path / "straight")
    assert [r["step"] for r in read_log(tmp_path / "resumed")] == list(range(1, 9))
    (model_a, tok_a, _), (model_b, tok_b, _) = load_run(tmp_path / "straight"), load_run(tmp_path / "resumed")
    params = [jax.tree.leaves(nnx.state(m, nnx.Param)) for m in (model_a, model_b)]
    assert all(np.array_equal(a, b) for a, b in zip(*params, strict=True))  # bit for bit

    # The run keeps its tokenizer, and load_run returns that one.
    on_disk = BPETokenizer.load(tmp_path / "straight" / TOKENIZER_FILE)
    assert isinstance(tok_a, BPETokenizer) and tok_a == on_disk == tok_b and 256 < tok_a.vocab_size <= 512
    text = "def main():\n    return self.value  # ok"
    assert np.array_equal(tok_a.encode(text), on_disk.encode(text)) and len(tok_a.encode(text)) < len(text)

    # Bits per byte from the validation split's own token and byte counts.
    tokens, n_bytes = split_counts(config, "validation", tok_a)
    assert n_bytes > tokens > 0
    assert straight["val_bits_per_byte"] == pytest.approx(straight["val_loss"] * tokens / n_bytes / math.log(2))
    assert "bits/byte" in (tmp_path / "straight" / "report.md").read_text()
    assert "val_bits_per_byte" in read_log(tmp_path / "straight")[-1]

    # Another tokenizer for this run is refused before anything changes.
    config.data.tokenizer, config.model.vocab_size = "bytes", 512
    with pytest.raises(ConfigError, match=re.escape("trained with data.tokenizer='bpe:512', not 'bytes'")):
        run(config, tmp_path / "straight")

    main(["sample", str(tmp_path / "straight"), "--prompt", "def ", "--tokens", "8", "--temperature", "0"])
    ids = generate(model_a, tok_a.encode("def ")[None], 8, temperature=0)[0]
    assert capsys.readouterr().out == tok_a.decode(ids) + "\n" + "-" * 40 + "\n"

    out = tmp_path / "ablation"
    clean, corrupted = "def f(x):\n    return (", "def f(y):\n    return ("
    main([
        "ablate", "--checkpoint", str(tmp_path / "straight"), "--batch_size", "4", "--seq", "32", "--patch",
        "--clean", clean, "--corrupted", corrupted, "--answer", "x", "--wrong", "y", "--out", str(out),
    ])  # fmt: skip
    assert "wrote" in capsys.readouterr().out
    rows = json.loads((out / "patching.json").read_text())["rows"]
    clean_ids = tok_a.encode(clean)
    assert len(rows) == 2 * len(clean_ids) < 2 * len(clean)  # positions are BPE tokens
    labels = [r["token"] for r in rows if r["layer"] == 0]
    assert labels == [tok_a.token_text(t) for t in clean_ids] and "".join(labels) == clean
    assert any(len(label) > 1 for label in labels)
