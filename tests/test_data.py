import json
import re

import numpy as np
import pytest

from resstream.data import (
    STDLIB,
    ByteTokenizer,
    DataError,
    Sampler,
    eval_batches,
    load_documents,
    stdlib_files,
    tokenized_corpus,
)


def test_byte_tokenizer_round_trips_unicode():
    tok = ByteTokenizer()
    text = "def f(x):\n    return 'π ≈ 3.14'  # ünïcode\n"
    ids = tok.encode(text)
    assert ids.max() < tok.vocab_size and tok.decode(ids) == text


def test_stdlib_corpus_splits_by_file_deterministically():
    train = load_documents(STDLIB, "train")
    validation = load_documents(STDLIB, "validation")
    train_paths, validation_paths = set(train["path"]), set(validation["path"])
    assert not train_paths & validation_paths
    assert len(train_paths) + len(validation_paths) == len(stdlib_files())
    assert 0.02 < len(validation_paths) / len(stdlib_files()) < 0.1
    assert set(load_documents(STDLIB, "validation")["path"]) == validation_paths
    assert "os.py" in train_paths | validation_paths


def test_tokenized_corpus_is_cached_as_a_memory_map(tmp_path):
    first = tokenized_corpus(STDLIB, "validation", tmp_path)
    cached = sorted(tmp_path.iterdir())
    assert len(cached) == 1 and not any(p.suffix == ".partial" for p in cached)
    second = tokenized_corpus(STDLIB, "validation", tmp_path)
    assert isinstance(second, np.memmap) and np.array_equal(first, second)
    text = "".join(load_documents(STDLIB, "validation")["text"])
    assert ByteTokenizer().decode(second[:1000]) == text.encode()[:1000].decode("utf-8", errors="replace")


@pytest.mark.parametrize("kind", ["txt", "jsonl", "parquet"])
def test_local_files_load_through_datasets(tmp_path, kind):
    docs = [f"document number {i}: " + "abc " * 50 for i in range(200)]
    if kind == "txt":
        for i, doc in enumerate(docs):
            (tmp_path / f"doc{i:03d}.txt").write_text(doc)
        source = str(tmp_path)
    elif kind == "jsonl":
        source = str(tmp_path / "corpus.jsonl")
        with open(source, "w") as f:
            for doc in docs:
                f.write(json.dumps({"body": doc, "id": 1}) + "\n")
    else:
        import datasets

        source = str(tmp_path / "corpus.parquet")
        datasets.Dataset.from_dict({"body": docs}).to_parquet(source)
    column = "text" if kind == "txt" else "body"
    train = load_documents(source, "train", text_column=column)
    validation = load_documents(source, "validation", text_column=column)
    assert len(train) + len(validation) == len(docs) and len(validation) > 0
    assert set(train["text"]) | set(validation["text"]) == set(docs)
    tokens = tokenized_corpus(source, "train", tmp_path / "cache", text_column=column)
    assert len(tokens) == sum(len(t.encode()) for t in train["text"])


def test_sampler_is_deterministic_resumable_and_covers_each_epoch():
    tokens = np.arange(1001, dtype=np.int64) % 256
    sampler = Sampler(tokens, seq_len=10, batch_size=7, seed=3)
    batches = [sampler.next_batch() for _ in range(40)]  # 280 windows: more than two epochs of 100
    assert batches[0].shape == (7, 11)
    first_epoch = np.concatenate(batches)[:100, 0]
    assert sorted(first_epoch.tolist()) == sorted((np.arange(100) * 10 % 256).tolist())
    resumed = Sampler(tokens, seq_len=10, batch_size=7, seed=3)
    replay = Sampler(tokens, seq_len=10, batch_size=7, seed=3)
    for _ in range(13):
        replay.next_batch()
    resumed.state = replay.state
    for expected in batches[13:]:
        assert np.array_equal(resumed.next_batch(), expected)
    other_seed = Sampler(tokens, seq_len=10, batch_size=7, seed=4)
    assert not np.array_equal(other_seed.next_batch(), batches[0])


def test_eval_batches_are_fixed():
    tokens = np.arange(5000) % 256
    a, b = eval_batches(tokens, 16, 4, 3), eval_batches(tokens, 16, 4, 3)
    assert len(a) == 3 and all(np.array_equal(x, y) for x, y in zip(a, b, strict=True))


def test_bad_data_gets_clear_errors(tmp_path):
    with pytest.raises(DataError, match=re.escape("data file missing/corpus.txt not found")):
        load_documents("missing/corpus.txt", "train")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(DataError, match=re.escape("holds no .txt")):
        load_documents(str(empty), "train")
    (tmp_path / "bad.txt").write_bytes(b"ok \xff\xfe not utf-8")
    with pytest.raises(DataError, match=re.escape("bad.txt is not UTF-8 text")):
        load_documents(str(tmp_path / "bad.txt"), "train")
    blank = tmp_path / "blank.txt"
    blank.write_text("")
    with pytest.raises(DataError, match="is empty"):
        tokenized_corpus(str(blank), "train", tmp_path / "cache")
    assert not list((tmp_path / "cache").glob("*"))  # nothing half-written left behind
    jsonl = tmp_path / "rows.jsonl"
    jsonl.write_text('{"content": "hello"}\n')
    with pytest.raises(DataError, match="no column 'text'; its columns are \\['content'\\]"):
        load_documents(str(jsonl), "train")
    with pytest.raises(DataError, match="fewer than one batch"):
        Sampler(np.zeros(50), seq_len=10, batch_size=8, seed=0, name="tiny corpus")
    with pytest.raises(DataError, match="choose one of \\['train', 'validation'\\]"):
        load_documents(STDLIB, "test")
