import json
import logging
import re
import sysconfig
import zlib
from pathlib import Path

import numpy as np
import pytest

from resstream import corpus
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


@pytest.fixture
def notes():
    """The messages of the "resstream" logger, caught by a handler of its own: the CLI may stop them
    from reaching the root logger, where caplog listens."""

    class Catch(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            messages.append(record.getMessage())

    messages: list[str] = []
    logger, handler = logging.getLogger("resstream"), Catch()
    logger.addHandler(handler)
    yield messages
    logger.removeHandler(handler)


def test_byte_tokenizer_round_trips_unicode():
    tok = ByteTokenizer()
    text = "def f(x):\n    return 'π ≈ 3.14'  # ünïcode\n"
    ids = tok.encode(text)
    assert ids.max() < tok.vocab_size and tok.decode(ids) == text


def test_stdlib_corpus_splits_by_file_deterministically():
    """Validation holds the files whose relative path's CRC32 falls in the lowest 5% (a coin that no
    process, machine or PYTHONHASHSEED changes), worked out here from the file list; train the rest."""
    train = load_documents(STDLIB, "train")
    validation = load_documents(STDLIB, "validation")
    train_paths, validation_paths = set(train["path"]), set(validation["path"])
    root = Path(sysconfig.get_paths()["stdlib"])
    every = {str(p.relative_to(root)) for p in stdlib_files()}
    expected = {path for path in every if zlib.crc32(path.encode()) % 10_000 < 500}
    assert validation_paths == expected and train_paths == every - expected
    assert 0.02 < len(validation_paths) / len(every) < 0.1
    assert "os.py" in train_paths | validation_paths
    first = validation[0]
    assert first["text"] == (root / first["path"]).read_bytes().decode("utf-8")


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


def test_eval_batches_are_fixed_windows_spread_evenly():
    """Windows of seq_len + 1 tokens starting at multiples of seq_len, spread evenly from the first
    window to the last (expected starts worked out by hand); fewer when the corpus is short."""
    tokens = np.arange(5000)  # each token is its own position, so a window shows where it starts
    # 4999 // 16 = 311 full windows after window 0; 12 windows at floor(i * 311 / 11), i = 0..11
    windows = [0, 28, 56, 84, 113, 141, 169, 197, 226, 254, 282, 311]
    expected = np.array([np.arange(16 * w, 16 * w + 17) for w in windows]).reshape(3, 4, 17)
    assert np.array_equal(np.stack(eval_batches(tokens, 16, 4, 3)), expected)
    # 99 // 16 = 6 windows: room for one batch of 4, at floor(i * 5 / 3) = 0, 1, 3, 5
    (short,) = eval_batches(np.arange(100), 16, 4, 3)
    assert np.array_equal(short, np.array([np.arange(16 * w, 16 * w + 17) for w in (0, 1, 3, 5)]))


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


def test_a_single_text_file_is_split_at_a_line_boundary(tmp_path, notes):
    corpus = tmp_path / "corpus.txt"
    text = "".join(f"line {i}\n" for i in range(40))
    corpus.write_text(text)
    train = tokenized_corpus(str(corpus), "train", tmp_path / "cache")
    validation = tokenized_corpus(str(corpus), "validation", tmp_path / "cache")
    assert bytes(validation) == b"line 38\nline 39\n" and bytes(train) + bytes(validation) == text.encode()
    assert notes == [
        f"data: {corpus} is a single document: split by line, the last 2 of 40 lines (5.0%) held out for validation"
    ]
    record = tmp_path / "record.jsonl"  # one record is one document too
    record.write_text(json.dumps({"text": "first\nsecond\nthird"}) + "\n")
    assert load_documents(str(record), "validation")["text"] == ["third"]
    assert load_documents(str(record), "train")["text"] == ["first\nsecond\n"]
    (tmp_path / "one.txt").write_text("a single line, however long\n")
    with pytest.raises(DataError, match=re.escape("one.txt is too small to split into train and validation")) as err:
        load_documents(str(tmp_path / "one.txt"), "train")
    assert "add text (2 lines at least), or pass a directory of files" in str(err.value)


def test_few_documents_or_files_are_split_by_position(tmp_path, notes):
    corpus = tmp_path / "three.jsonl"  # at a fraction of 0.02 no document's hash falls in validation
    corpus.write_text("".join(json.dumps({"text": f"doc {i}"}) + "\n" for i in range(3)))
    assert load_documents(str(corpus), "train", validation_fraction=0.02)["text"] == ["doc 0", "doc 1"]
    assert load_documents(str(corpus), "validation", validation_fraction=0.02)["text"] == ["doc 2"]
    files = tmp_path / "files"  # nor does any of these files' names at 0.05
    files.mkdir()
    for name in ("a", "b", "c"):
        (files / f"{name}.txt").write_text(f"text of {name}\n")
    assert load_documents(str(files), "train")["text"] == ["text of a\n", "text of b\n"]
    assert load_documents(str(files), "validation")["text"] == ["text of c\n"]
    assert notes == [
        f"data: hashing the 3 documents of {corpus} left the validation split empty: split by position instead, "
        "the last 1 of 3 documents held out for validation",
        f"data: hashing the 3 files of {files} left the validation split empty: split by position instead, "
        "the last 1 of 3 files held out for validation",
    ]


def test_bad_json_files_get_clear_errors_and_leave_nothing_in_the_cache(tmp_path):
    cache = tmp_path / "cache"
    bad = tmp_path / "bad.jsonl"
    bad.write_bytes(b'{"text": "hello"}\n{"text": "ok \xff bad"}\n')
    message = f"{bad} is not UTF-8 text: byte 0xff at offset 31 (line 2) is not valid UTF-8; convert it to UTF-8"
    with pytest.raises(DataError, match=re.escape(message)) as err:
        tokenized_corpus(str(bad), "train", cache)
    assert isinstance(err.value.__cause__, UnicodeDecodeError)
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    with pytest.raises(DataError, match=re.escape(f"{empty} holds no records: add records with a 'text' field")):
        tokenized_corpus(str(empty), "train", cache)
    assert not list(cache.iterdir())


@pytest.mark.parametrize("chunk_size", [1, 2, 3, 5, 64])
def test_utf8_check_finds_the_first_bad_byte_across_chunks(tmp_path, chunk_size):
    path = tmp_path / "text.jsonl"
    path.write_bytes("é\n".encode() * 5 + b"\xff")  # two-byte characters cut by small chunks
    with pytest.raises(DataError, match=re.escape("byte 0xff at offset 15 (line 6)")):
        corpus._scan_text_file(path, chunk_size=chunk_size)
    path.write_bytes(b" \n\t")
    assert not corpus._scan_text_file(path, chunk_size=chunk_size)


def test_a_failure_while_tokenizing_leaves_no_partial_file(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    # Parquet strings are not checked for UTF-8 on writing or loading, only when a row is read.
    offsets = pa.py_buffer(np.array([0, 2, 5], dtype=np.int32).tobytes())
    texts = pa.Array.from_buffers(pa.string(), 2, [None, offsets, pa.py_buffer(b"okb\xffd")])
    source = tmp_path / "bad.parquet"
    pq.write_table(pa.table({"text": texts}), source)
    message = f"the train split of {source} holds text that is not UTF-8 (byte 0xff at offset 1 of a document)"
    with pytest.raises(DataError, match=re.escape(message)):
        tokenized_corpus(str(source), "train", tmp_path / "cache")  # the second document, by hash

    class Failing(ByteTokenizer):
        def encode(self, text):
            raise OSError("disk full")

    (tmp_path / "corpus.txt").write_text("one\ntwo\n")
    with pytest.raises(OSError, match="disk full"):
        tokenized_corpus(str(tmp_path / "corpus.txt"), "train", tmp_path / "cache", tokenizer=Failing())
    assert not list((tmp_path / "cache").iterdir())
