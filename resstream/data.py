"""Data: text corpora through HuggingFace `datasets`, a byte-level tokenizer, tokenized corpora
cached on disk as memory-mapped arrays, and a deterministic sampler whose position can be saved.

Sources: "stdlib" (the default corpus: the running interpreter's own standard-library sources,
needing no download), local files (.txt/.md/.py as whole documents, .jsonl/.json and .parquet with
a text column), or a dataset name on the HuggingFace hub when the network allows.
Train and validation are split deterministically: by file, or by document for a single file.
"""

from __future__ import annotations

import hashlib
import os
import sysconfig
import tempfile
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

STDLIB = "stdlib"
SPLITS = ("train", "validation")
TEXT_SUFFIXES = (".txt", ".md", ".py", ".text")
JSON_SUFFIXES = (".jsonl", ".json")
PARQUET_SUFFIXES = (".parquet",)


class DataError(ValueError):
    """The data could not be found, read or used."""


class ByteTokenizer:
    """UTF-8 bytes as token ids 0..255: no vocabulary file, no download."""

    vocab_size = 256
    dtype = np.uint8

    def encode(self, text: str | bytes) -> np.ndarray:
        data = text.encode("utf-8") if isinstance(text, str) else bytes(text)
        return np.frombuffer(data, dtype=np.uint8)

    def decode(self, ids: np.ndarray | list[int]) -> str:
        return bytes(np.asarray(ids, dtype=np.uint8).tolist()).decode("utf-8", errors="replace")


def _in_validation(key: str, validation_fraction: float) -> bool:
    """A stable, machine-independent coin: the CRC32 of a file path or document key."""
    return zlib.crc32(key.encode("utf-8")) % 10_000 < validation_fraction * 10_000


def stdlib_root() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def stdlib_files() -> list[Path]:
    """The interpreter's standard-library sources, sorted: site-packages excluded, and the few
    files that are not UTF-8 (encoding fixtures of the test suite, such as
    test/encoded_modules/module_iso_8859_1.py) left out."""
    files = [p for p in _stdlib_candidates() if _is_utf8(p)]
    if not files:
        raise DataError(f"no standard-library sources under {stdlib_root()}: pass a local corpus with data.source=PATH")
    return files


def _stdlib_candidates() -> list[Path]:
    """The standard library's .py files, site-packages excluded (listed, not read)."""
    root = stdlib_root()
    return sorted(p for p in root.rglob("*.py") if "site-packages" not in p.relative_to(root).parts)


def _is_utf8(path: Path) -> bool:
    try:
        path.read_bytes().decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


def _check_split(split: str) -> None:
    if split not in SPLITS:
        raise DataError(f"split={split!r}: choose one of {list(SPLITS)}")


def load_documents(source: str, split: str, *, text_column: str = "text", validation_fraction: float = 0.05):
    """The documents of one split as a `datasets.Dataset` with a "text" column."""
    import datasets

    _check_split(split)
    if source == STDLIB:
        root = stdlib_root()
        chosen = [
            p
            for p in stdlib_files()
            if _in_validation(str(p.relative_to(root)), validation_fraction) == (split == "validation")
        ]
        texts = [_read_text(p) for p in chosen]
        return datasets.Dataset.from_dict({"text": texts, "path": [str(p.relative_to(root)) for p in chosen]})
    all_files = _local_files(source)
    if all_files is None:
        return _hub_dataset(source, split, text_column)
    files = all_files
    suffixes = {p.suffix for p in files}
    if len(suffixes) > 1:
        raise DataError(f"{source} mixes file types {sorted(suffixes)}: point at files of one kind")
    suffix = suffixes.pop()
    if len(files) > 1:  # split by file
        files = [p for p in files if _in_validation(p.name, validation_fraction) == (split == "validation")]
        if not files:
            raise DataError(f"{source}: no file falls in the {split} split; add files or use a single file")
    dataset = _load_files(files, suffix, text_column)
    if len(all_files) == 1:  # one file: split by document
        keep = [
            i for i in range(len(dataset)) if _in_validation(f"{i}", validation_fraction) == (split == "validation")
        ]
        dataset = dataset.select(keep)
    return dataset


def _read_text(path: Path) -> str:
    try:
        return path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as err:
        raise DataError(
            f"{path} is not UTF-8 text (byte {err.start}): convert it or remove it from the corpus"
        ) from None


def _local_files(source: str) -> list[Path] | None:
    """Files named by a path, a directory or a glob; None when `source` names no local path."""
    path = Path(source)
    if path.is_file():
        return [path]
    if path.is_dir():
        files = sorted(
            p for p in path.rglob("*") if p.is_file() and p.suffix in TEXT_SUFFIXES + JSON_SUFFIXES + PARQUET_SUFFIXES
        )
        if not files:
            raise DataError(f"directory {source} holds no .txt/.md/.py, .jsonl/.json or .parquet files")
        return files
    if any(ch in source for ch in "*?["):
        files = sorted(Path().glob(source)) if not path.is_absolute() else sorted(Path("/").glob(source.lstrip("/")))
        if not files:
            raise DataError(f"no files match {source}")
        return files
    # A hub name is "name" or "owner/name"; anything else that does not exist is a missing file.
    looks_like_a_path = bool(path.suffix) or source.startswith((".", "~", "/")) or source.count("/") > 1
    if looks_like_a_path:
        raise DataError(f"data file {source} not found: check the path (or use data.source=stdlib)")
    return None


def _load_files(files: list[Path], suffix: str, text_column: str):
    import datasets

    names = [str(p) for p in files]
    if suffix in TEXT_SUFFIXES:
        dataset = datasets.Dataset.from_dict({"text": [_read_text(p) for p in files], "path": names})
    else:
        builder = "json" if suffix in JSON_SUFFIXES else "parquet"
        try:
            dataset = datasets.load_dataset(builder, data_files=names, split="train")
        except Exception as err:
            raise DataError(f"could not read {names} as {builder}: {err}") from None
        if text_column not in dataset.column_names:
            raise DataError(
                f"{names[0]} has no column {text_column!r}; its columns are {dataset.column_names}: "
                "set data.text_column"
            )
        if text_column != "text":
            dataset = dataset.rename_column(text_column, "text")
    return dataset


def _hub_dataset(name: str, split: str, text_column: str):
    import datasets

    try:
        dataset = datasets.load_dataset(name, split=split)
    except Exception as err:
        raise DataError(
            f"{name!r} is neither a local path nor a dataset that could be loaded from the hub "
            f"({type(err).__name__}: {err}); offline, use a local file or data.source=stdlib"
        ) from None
    if text_column not in dataset.column_names:
        raise DataError(f"{name} has no column {text_column!r}; its columns are {dataset.column_names}")
    return dataset.rename_column(text_column, "text") if text_column != "text" else dataset


def _fingerprint(source: str, split: str, text_column: str, validation_fraction: float) -> str:
    """Identifies a tokenized corpus: the source's files (path, size, mtime) and the split."""
    digest = hashlib.sha256(f"{source}|{split}|{text_column}|{validation_fraction}|bytes-v1".encode())
    # Listing and stat only: a cache hit must not read the corpus.
    files = _stdlib_candidates() if source == STDLIB else (_local_files(source) or [])
    for p in files:
        stat = p.stat()
        digest.update(f"{p}|{stat.st_size}|{stat.st_mtime_ns}".encode())
    return digest.hexdigest()[:16]


def tokenized_corpus(
    source: str,
    split: str,
    cache_dir: str | os.PathLike,
    *,
    text_column: str = "text",
    validation_fraction: float = 0.05,
    tokenizer: ByteTokenizer | None = None,
) -> np.ndarray:
    """All documents of a split tokenized and concatenated, as a read-only memory-mapped array.

    The first call tokenizes and writes `cache_dir/tokens-<fingerprint>.bin` (atomically: a
    half-written file is never left under that name); later calls map it at once."""
    tokenizer = tokenizer or ByteTokenizer()
    _check_split(split)
    cache_dir = Path(cache_dir)
    cache_dir.mkdir(parents=True, exist_ok=True)
    path = cache_dir / f"tokens-{split}-{_fingerprint(source, split, text_column, validation_fraction)}.bin"
    if not path.exists():
        documents = load_documents(source, split, text_column=text_column, validation_fraction=validation_fraction)
        with tempfile.NamedTemporaryFile(dir=cache_dir, delete=False, suffix=".partial") as out:
            n_tokens = 0
            for text in documents["text"]:
                if text is None:
                    continue
                ids = tokenizer.encode(text).astype(tokenizer.dtype)
                out.write(ids.tobytes())
                n_tokens += len(ids)
        if n_tokens == 0:
            os.unlink(out.name)
            raise DataError(f"the {split} split of {source} is empty: it holds no text")
        os.replace(out.name, path)
    return np.memmap(path, dtype=tokenizer.dtype, mode="r")


@dataclass
class SamplerState:
    """Where the sampler is: which pass over the data, and how far into it."""

    epoch: int = 0
    index: int = 0


class Sampler:
    """Batches [batch, seq_len + 1] of packed sequences (inputs are [:, :-1], targets [:, 1:]).

    The corpus is cut into non-overlapping windows; each epoch visits them all in an order drawn
    from (seed, epoch). The state (epoch, index) is all there is to save for an exact resume."""

    def __init__(self, tokens: np.ndarray, seq_len: int, batch_size: int, seed: int, name: str = "corpus"):
        self.tokens, self.seq_len, self.batch_size, self.seed = tokens, seq_len, batch_size, seed
        self.n_windows = (len(tokens) - 1) // seq_len
        if self.n_windows < batch_size:
            raise DataError(
                f"{name} has {len(tokens)} tokens: fewer than one batch of {batch_size} x {seq_len + 1}; "
                "use more data, a smaller batch or a shorter context"
            )
        self.state = SamplerState()
        self._order_epoch, self._order = -1, None

    def _order_for(self, epoch: int) -> np.ndarray:
        if epoch != self._order_epoch:
            self._order = np.random.default_rng([self.seed, epoch]).permutation(self.n_windows)
            self._order_epoch = epoch
        return self._order

    def next_batch(self, rows: slice | None = None) -> np.ndarray:
        """The next batch [batch, seq_len + 1]; `rows` (one host's share of a batch split over
        many hosts) reads only those rows, while the position advances by the whole batch."""
        starts = []
        for _ in range(self.batch_size):
            if self.state.index == self.n_windows:
                self.state = SamplerState(self.state.epoch + 1, 0)
            starts.append(self._order_for(self.state.epoch)[self.state.index] * self.seq_len)
            self.state = SamplerState(self.state.epoch, self.state.index + 1)
        starts = starts if rows is None else starts[rows]
        return np.stack([np.asarray(self.tokens[s : s + self.seq_len + 1]) for s in starts]).astype(np.int32)


def eval_batches(tokens: np.ndarray, seq_len: int, batch_size: int, n_batches: int) -> list[np.ndarray]:
    """A fixed set of evaluation batches: windows spread evenly over the corpus, the same every time."""
    n_windows = (len(tokens) - 1) // seq_len
    if n_windows < batch_size:
        raise DataError(
            f"the validation split has {len(tokens)} tokens: fewer than one batch of {batch_size} x {seq_len + 1}"
        )
    count = min(n_windows, batch_size * n_batches) // batch_size * batch_size
    starts = np.linspace(0, n_windows - 1, count).astype(np.int64) * seq_len
    windows = np.stack([np.asarray(tokens[s : s + seq_len + 1]) for s in starts]).astype(np.int32)
    return list(windows.reshape(-1, batch_size, seq_len + 1))
