"""Data for training: a byte-level tokenizer, tokenized corpora cached on disk as memory-mapped
arrays, and a deterministic sampler whose position can be saved. The documents come from
`corpus.py`, which reads and splits a data source.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from resstream.corpus import (  # noqa: F401  (DataError, STDLIB, stdlib_files: this module's public names too)
    STDLIB,
    DataError,
    _arrow_strings,
    _check_split,
    _local_files,
    _stdlib_candidates,
    load_documents,
    stdlib_files,
)


class ByteTokenizer:
    """UTF-8 bytes as token ids 0..255: no vocabulary file, no download."""

    vocab_size = 256
    dtype = np.uint8

    def encode(self, text: str | bytes) -> np.ndarray:
        """Text (str, UTF-8 encoded, or bytes) -> token ids [n] uint8, one per byte."""
        data = text.encode("utf-8") if isinstance(text, str) else bytes(text)
        return np.frombuffer(data, dtype=np.uint8)

    def decode(self, ids: np.ndarray | list[int]) -> str:
        """Token ids -> text; bytes that are not valid UTF-8 become U+FFFD."""
        return bytes(np.asarray(ids, dtype=np.uint8).tolist()).decode("utf-8", errors="replace")


def _fingerprint(source: str, split: str, text_column: str, validation_fraction: float) -> str:
    """Identifies a tokenized corpus: the source's files (path, size, mtime) and the split."""
    digest = hashlib.sha256(f"{source}|{split}|{text_column}|{validation_fraction}|bytes-v2".encode())
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
        _write_tokens(documents, tokenizer, path, f"the {split} split of {source}")
    return np.memmap(path, dtype=tokenizer.dtype, mode="r")


def _write_tokens(documents, tokenizer: ByteTokenizer, path: Path, name: str) -> None:
    """Tokenize `documents` into `path` through a temporary file: a failure at any point (a bad document,
    a full disk, an interrupt) leaves neither a half-written file under `path` nor a `*.partial` file."""
    fd, partial = tempfile.mkstemp(dir=path.parent, suffix=".partial")
    try:
        with os.fdopen(fd, "wb") as out, _arrow_strings(name):
            n_tokens = 0
            for text in documents["text"]:
                if text is None:
                    continue
                ids = tokenizer.encode(text).astype(tokenizer.dtype)
                out.write(ids.tobytes())
                n_tokens += len(ids)
        if n_tokens == 0:
            raise DataError(f"{name} is empty: it holds no text")
        os.replace(partial, path)
    finally:
        Path(partial).unlink(missing_ok=True)


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


def split_tokens(config: Any, split: str) -> np.ndarray:
    """The tokenized "train" or "validation" split of a run config's data (cached, see
    `tokenized_corpus`)."""
    data = config.data
    return tokenized_corpus(
        data.source, split, data.cache_dir, text_column=data.text_column, validation_fraction=data.validation_fraction
    )
