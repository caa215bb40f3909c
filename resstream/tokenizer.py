"""Tokenizers beyond bytes: a byte-level BPE trained with HuggingFace `tokenizers` (or any
`tokenizer.json`), and the run config's `data.tokenizer`, resolved to the tokenizer a run uses:

- `"bytes"`: `data.ByteTokenizer`, UTF-8 bytes as ids 0..255 (the default);
- `"bpe:N"`: a byte-level BPE of at most N tokens trained on the run's training split;
- a path to a `tokenizer.json`.

A run keeps its tokenizer as `RUN_DIR/tokenizer.json` (none for bytes): resuming and `load_run` use
that file, whatever the config names.
"""

from __future__ import annotations

import functools
import hashlib
import json
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from resstream.config import ConfigError
from resstream.data import ByteTokenizer, _arrow_strings, _fingerprint, _write_atomically, bytes_label, load_documents

TOKENIZER_FILE = "tokenizer.json"
MAX_VOCAB = 1 << 32  # token ids are stored as uint32 at most


class BPETokenizer:
    """A `tokenizers.Tokenizer` with `ByteTokenizer`'s interface: numpy ids of the smallest dtype that
    holds the vocabulary (uint16 up to 65536 tokens, else uint32), no special tokens added."""

    def __init__(self, tokenizer: Tokenizer):
        self.tokenizer = tokenizer
        self.vocab_size = tokenizer.get_vocab_size(with_added_tokens=True)
        self.dtype = np.uint16 if self.vocab_size <= 1 << 16 else np.uint32
        self.json = tokenizer.to_str()
        # names the tokenizer in token-cache file names: a hash of its canonical JSON
        self.fingerprint = "tokenizer-" + hashlib.sha256(self.json.encode()).hexdigest()[:16]

    @classmethod
    def load(cls, path: str | Path) -> BPETokenizer:
        """The tokenizer in a `tokenizer.json`; ConfigError when the file is missing or not one."""
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"tokenizer file {path} does not exist: name an existing tokenizer.json")
        try:
            return cls(Tokenizer.from_file(str(path)))
        except Exception as err:  # the library raises a bare Exception for a file it cannot parse
            raise ConfigError(
                f"{path} is not a tokenizer.json that HuggingFace tokenizers can load ({err}): name a tokenizer "
                'saved by tokenizers (Tokenizer.save), or use data.tokenizer="bytes" or "bpe:N"'
            ) from err

    def encode(self, text: str) -> np.ndarray:
        """Text -> token ids [n]."""
        return np.asarray(self.tokenizer.encode(text, add_special_tokens=False).ids, dtype=self.dtype)

    def encode_batch(self, texts: Iterable[str]) -> list[np.ndarray]:
        """`encode` of each text, encoded in parallel on every core."""
        encodings = self.tokenizer.encode_batch_fast(list(texts), add_special_tokens=False)
        return [np.asarray(e.ids, dtype=self.dtype) for e in encodings]

    def decode(self, ids: np.ndarray | list[int]) -> str:
        """Token ids -> text; bytes that are not valid UTF-8 become U+FFFD."""
        return self.tokenizer.decode([int(i) for i in np.asarray(ids).reshape(-1)], skip_special_tokens=False)

    def token_text(self, token: int) -> str:
        """One token's text (e.g. `" the"`)."""
        return self.decode([token])

    def token_bytes(self, token: int) -> bytes:
        """One token's bytes: its byte-level string mapped back to bytes (or its text's UTF-8 bytes
        for a tokenizer.json that is not byte-level)."""
        piece = self.tokenizer.id_to_token(int(token))
        to_byte = unicode_to_byte()
        if piece is not None and all(c in to_byte for c in piece):
            return bytes(to_byte[c] for c in piece)
        return self.token_text(token).encode("utf-8")

    def token_label(self, token: int) -> str:
        """One token as a visible label (see `data.bytes_label`): `' the'`, `'\\n'`."""
        return bytes_label(self.token_bytes(token))

    def save(self, path: str | Path) -> None:
        """Write the tokenizer.json atomically: `path` never holds half of one."""
        _write_atomically(Path(path), self.tokenizer.to_str(pretty=True))

    def __eq__(self, other: object) -> bool:
        return isinstance(other, BPETokenizer) and other.json == self.json

    def __hash__(self) -> int:
        return hash(self.json)


@functools.cache
def unicode_to_byte() -> dict[str, int]:
    """The inverse of the byte-level alphabet (GPT-2's `bytes_to_unicode`): printable bytes stand for
    themselves, the others for the characters from U+0100 on."""
    kept = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    moved = [b for b in range(256) if b not in kept]
    return {**{chr(b): b for b in kept}, **{chr(256 + i): b for i, b in enumerate(moved)}}


def train_bpe(texts: Iterable[str], vocab_size: int) -> BPETokenizer:
    """A byte-level BPE of at most `vocab_size` tokens (the 256 bytes and the merges learnt from
    `texts`), no special tokens: every text round-trips through encode and decode."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False
    )
    tokenizer.train_from_iterator(texts, trainer=trainer)
    return BPETokenizer(tokenizer)


def parse_tokenizer(value: Any) -> tuple[str, int | Path | None]:
    """`data.tokenizer` as ("bytes", None), ("bpe", N) or ("file", path); ConfigError saying how to
    fix anything else (a bad N, a missing file)."""
    if value == "bytes":
        return "bytes", None
    choices = 'use "bytes", "bpe:N" (N from 257 to 2**32) or the path of an existing tokenizer.json'
    if isinstance(value, str) and value.startswith("bpe:"):
        n = value.removeprefix("bpe:")
        if not n.isdigit() or not 256 < int(n) <= MAX_VOCAB:
            raise ConfigError(
                f"data.tokenizer={value!r}: N must be an integer from 257 (the 256 bytes and one merge) to "
                f"2**32, e.g. --config.data.tokenizer=bpe:4096; or {choices.removeprefix('use ')}"
            )
        return "bpe", int(n)
    if not isinstance(value, str) or not value:
        raise ConfigError(f"data.tokenizer={value!r} is not a tokenizer: {choices}")
    path = Path(value).expanduser()
    if not path.is_file():
        raise ConfigError(f"data.tokenizer={value!r} is neither a tokenizer name nor an existing file: {choices}")
    return "file", path


def check_vocab(value: Any, vocab_size: int) -> None:
    """ConfigError, naming the value to set, when a model of `vocab_size` would have no embedding
    for some token id of tokenizer `value` (a file is loaded; "bpe:N" is checked against N)."""
    kind, arg = parse_tokenizer(value)
    if kind == "file":
        needed = BPETokenizer.load(arg).vocab_size
    else:
        needed = ByteTokenizer.vocab_size if kind == "bytes" else arg
    if vocab_size < needed:
        name = "bytes" if kind == "bytes" else value
        fix = f"set --config.model.vocab_size={needed}"
        if kind == "bpe":
            fix += f", or a smaller N in --config.data.tokenizer=bpe:{vocab_size}"
        raise ConfigError(
            f"model.vocab_size={vocab_size} is smaller than the tokenizer's vocabulary ({name}: {needed} tokens), "
            f"so some token ids of the data would have no embedding: {fix}"
        )


def tokenizer_for(config: Any, run_dir: str | Path) -> ByteTokenizer | BPETokenizer:
    """The tokenizer a run trains with, per `config.data.tokenizer`: a resumed run's own
    (run_dir/tokenizer.json), a tokenizer.json file, or "bpe:N" trained on the training split (once:
    kept in data.cache_dir, written atomically). Writes nothing in `run_dir` (`save_to_run` does);
    ConfigError when the config names another tokenizer than the run in `run_dir` was trained with."""
    value = config.data.tokenizer
    kind, arg = parse_tokenizer(value)
    run_dir = Path(run_dir)
    _check_same_as_run(value, kind, arg, run_dir)
    if kind == "bytes":
        return ByteTokenizer()
    if (run_dir / TOKENIZER_FILE).is_file():
        return BPETokenizer.load(run_dir / TOKENIZER_FILE)
    return BPETokenizer.load(arg) if kind == "file" else _trained(config, arg)


def _check_same_as_run(value: str, kind: str, arg: Any, run_dir: Path) -> None:
    """ConfigError when `run_dir` holds a run (config.json) trained with another tokenizer."""
    try:
        saved = json.loads((run_dir / "config.json").read_text())["data"].get("tokenizer", "bytes")
    except (OSError, ValueError, KeyError, AttributeError):
        return  # no run there yet (or not one whose tokenizer can be told): nothing to contradict
    if saved == value:
        return
    own = run_dir / TOKENIZER_FILE
    if kind == "file" and own.is_file() and BPETokenizer.load(arg) == BPETokenizer.load(own):
        return  # the same tokenizer, named by another path
    raise ConfigError(
        f"{run_dir} was trained with data.tokenizer={saved!r}, not {value!r}: resume it with "
        f"--config.data.tokenizer={saved}, or train in a new --run_dir"
    )


def _trained(config: Any, vocab_size: int) -> BPETokenizer:
    """A BPE of `vocab_size` trained on the config's training split, or the one trained before on
    the same split (data.cache_dir/tokenizer-bpeN-<split fingerprint>.json)."""
    data = config.data
    cache_dir = Path(data.cache_dir)
    key = _fingerprint(data.source, "train", data.text_column, data.validation_fraction, f"bpe{vocab_size}")
    cached = cache_dir / f"tokenizer-bpe{vocab_size}-{key}.json"
    if cached.is_file():
        return BPETokenizer.load(cached)
    documents = load_documents(
        data.source, "train", text_column=data.text_column, validation_fraction=data.validation_fraction
    )
    with _arrow_strings(f"the train split of {data.source}"):
        tokenizer = train_bpe(_texts(documents), vocab_size)
    cache_dir.mkdir(parents=True, exist_ok=True)
    tokenizer.save(cached)
    return tokenizer


def _texts(documents: Any) -> Iterator[str]:
    return (text for text in documents["text"] if text)


def save_to_run(tokenizer: ByteTokenizer | BPETokenizer, run_dir: str | Path) -> None:
    """Keep the run's tokenizer in `run_dir` (tokenizer.json, written atomically; nothing for bytes)."""
    path = Path(run_dir) / TOKENIZER_FILE
    if isinstance(tokenizer, BPETokenizer) and not path.is_file():
        tokenizer.save(path)


def load_tokenizer(run_dir: str | Path) -> ByteTokenizer | BPETokenizer:
    """The tokenizer a run in `run_dir` was trained with: its tokenizer.json, else bytes."""
    path = Path(run_dir) / TOKENIZER_FILE
    return BPETokenizer.load(path) if path.is_file() else ByteTokenizer()
