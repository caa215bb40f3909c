"""Data for training: a byte-level tokenizer (trained BPE tokenizers are in `tokenizer.py`),
tokenized corpora cached on disk as memory-mapped arrays, and a deterministic sampler whose position
can be saved. The documents come from `corpus.py`, which reads and splits a data source.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import tempfile
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

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

BYTES_FINGERPRINT = "bytes-v2"  # the token caches of the byte tokenizer are keyed by it (unchanged since v2)
DOCUMENTS_PER_BATCH = 256  # documents handed to a tokenizer's batch encoding at a time


class Tokenizer(Protocol):
    """What the data pipeline, sampling and the reports need of a tokenizer."""

    vocab_size: int
    dtype: Any
    fingerprint: str  # identifies the tokenizer in token-cache names

    def encode(self, text: str) -> np.ndarray: ...
    def encode_batch(self, texts: list[str]) -> list[np.ndarray]: ...
    def decode(self, ids: np.ndarray | list[int]) -> str: ...
    def token_text(self, token: int) -> str: ...
    def token_label(self, token: int) -> str: ...


def bytes_label(data: bytes) -> str:
    """A token's bytes as a label that is never invisible: its text quoted with Python's escapes
    (`' the'`, `'\\n'`), or a bytes literal (`b'\\xe2\\x80'`) when it is not whole UTF-8."""
    try:
        return repr(data.decode("utf-8"))
    except UnicodeDecodeError:
        return repr(data)


class ByteTokenizer:
    """UTF-8 bytes as token ids 0..255: no vocabulary file, no download."""

    vocab_size = 256
    dtype = np.uint8
    fingerprint = BYTES_FINGERPRINT

    def encode(self, text: str | bytes) -> np.ndarray:
        """Text (str, UTF-8 encoded, or bytes) -> token ids [n] uint8, one per byte."""
        data = text.encode("utf-8") if isinstance(text, str) else bytes(text)
        return np.frombuffer(data, dtype=np.uint8)

    def encode_batch(self, texts: Iterable[str | bytes]) -> list[np.ndarray]:
        """`encode` of each text."""
        return [self.encode(text) for text in texts]

    def decode(self, ids: np.ndarray | list[int]) -> str:
        """Token ids -> text; bytes that are not valid UTF-8 become U+FFFD."""
        return bytes(np.asarray(ids, dtype=np.uint8).tolist()).decode("utf-8", errors="replace")

    def token_text(self, token: int) -> str:
        """One token's text (a byte that is not whole UTF-8 becomes U+FFFD)."""
        return self.decode([token])

    def token_label(self, token: int) -> str:
        """One token as a visible label (see `bytes_label`)."""
        return bytes_label(bytes([int(token)]))


def _fingerprint(
    source: str, split: str, text_column: str, validation_fraction: float, tokenizer: str = BYTES_FINGERPRINT
) -> str:
    """Identifies a tokenized corpus: the source's files (path, size, mtime), the split and the
    tokenizer (its `fingerprint`)."""
    digest = hashlib.sha256(f"{source}|{split}|{text_column}|{validation_fraction}|{tokenizer}".encode())
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
    tokenizer: Tokenizer | None = None,
) -> np.ndarray:
    """All documents of a split tokenized and concatenated, as a read-only memory-mapped array of the
    tokenizer's dtype.

    The first call tokenizes and writes `cache_dir/tokens-<split>-<fingerprint>.bin` (atomically: a
    half-written file is never left under that name), and for a tokenizer other than bytes its counts
    (`.json`: tokens and UTF-8 bytes); later calls map it at once. The fingerprint covers the
    tokenizer (bytes keep the fingerprint they had before tokenizers were configurable)."""
    tokenizer = tokenizer or ByteTokenizer()
    _check_split(split)
    cache_dir = Path(cache_dir)
    cache_dir.mkdir(parents=True, exist_ok=True)
    fingerprint = _fingerprint(source, split, text_column, validation_fraction, tokenizer.fingerprint)
    path = cache_dir / f"tokens-{split}-{fingerprint}.bin"
    if not path.exists() or (_counted(tokenizer) and not _counts_file(path).exists()):
        documents = load_documents(source, split, text_column=text_column, validation_fraction=validation_fraction)
        _write_tokens(documents, tokenizer, path, f"the {split} split of {source}")
    return np.memmap(path, dtype=tokenizer.dtype, mode="r")


def corpus_counts(source: str, split: str, cache_dir: str | os.PathLike, **kwargs: Any) -> tuple[int, int]:
    """(tokens, UTF-8 bytes) of a tokenized split (`tokenized_corpus`'s arguments; tokenized if not
    cached yet): what converts a loss per token into one per byte."""
    tokens = tokenized_corpus(source, split, cache_dir, **kwargs)
    counts = _counts_file(Path(tokens.filename))
    if counts.exists():
        recorded = json.loads(counts.read_text())
        return int(recorded["tokens"]), int(recorded["bytes"])
    return len(tokens), len(tokens)  # bytes: one token per byte


def _counted(tokenizer: Tokenizer) -> bool:
    """Whether a cache of this tokenizer's tokens has its counts recorded: bytes need none (one
    token per byte), so their caches are the files they always were."""
    return tokenizer.fingerprint != BYTES_FINGERPRINT


def _counts_file(path: Path) -> Path:
    return path.with_suffix(".json")


def _batches(documents: Any, size: int) -> Iterator[list[str]]:
    """The documents' texts (None skipped) in lists of `size`."""
    texts = (text for text in documents["text"] if text is not None)
    while batch := list(itertools.islice(texts, size)):
        yield batch


def _write_tokens(documents, tokenizer: Tokenizer, path: Path, name: str) -> None:
    """Tokenize `documents` (a batch of documents at a time, with the tokenizer's batch encoding)
    into `path` and their counts into its `.json`, through temporary files: a failure at any point
    (a bad document, a full disk, an interrupt) leaves neither a half-written file under `path` nor a
    `*.partial` file."""
    fd, partial = tempfile.mkstemp(dir=path.parent, suffix=".partial")
    try:
        with os.fdopen(fd, "wb") as out, _arrow_strings(name):
            n_tokens = n_bytes = 0
            for texts in _batches(documents, DOCUMENTS_PER_BATCH):
                for ids in tokenizer.encode_batch(texts):
                    out.write(np.asarray(ids).astype(tokenizer.dtype).tobytes())
                    n_tokens += len(ids)
                if _counted(tokenizer):  # (a byte tokenizer's count is its tokens')
                    n_bytes += sum(len(text.encode("utf-8")) for text in texts)
        if n_tokens == 0:
            raise DataError(f"{name} is empty: it holds no text")
        if _counted(tokenizer):
            _write_atomically(_counts_file(path), json.dumps({"tokens": n_tokens, "bytes": n_bytes}))
        os.replace(partial, path)
    finally:
        Path(partial).unlink(missing_ok=True)


def _write_atomically(path: Path, text: str) -> None:
    """`path` holds `text`, or (after any failure) what it held before: never half of it."""
    fd, partial = tempfile.mkstemp(dir=path.parent, suffix=".partial")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as out:
            out.write(text)
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


def split_tokens(config: Any, split: str, tokenizer: Tokenizer | None = None) -> np.ndarray:
    """The "train" or "validation" split of a run config's data tokenized by `tokenizer` (default:
    bytes; the run's is `tokenizer.tokenizer_for`), cached (see `tokenized_corpus`)."""
    return tokenized_corpus(config.data.source, split, config.data.cache_dir, **_split_kwargs(config, tokenizer))


def split_counts(config: Any, split: str, tokenizer: Tokenizer | None = None) -> tuple[int, int]:
    """(tokens, UTF-8 bytes) of a run config's split (see `corpus_counts`)."""
    return corpus_counts(config.data.source, split, config.data.cache_dir, **_split_kwargs(config, tokenizer))


def _split_kwargs(config: Any, tokenizer: Tokenizer | None) -> dict[str, Any]:
    data = config.data
    return dict(text_column=data.text_column, validation_fraction=data.validation_fraction, tokenizer=tokenizer)
