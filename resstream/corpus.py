"""Text corpora: the documents a data source names, read through HuggingFace `datasets` and split
deterministically into train and validation.

Sources: "stdlib" (the default corpus: the running interpreter's own standard-library sources,
needing no download), local files (.txt/.md/.py as whole documents, .jsonl/.json and .parquet with
a text column), or a dataset name on the HuggingFace hub when the network allows.
Train and validation are split by file, or by document for a single file (by line for a single
document), each by a hash of its name or index; where hashing leaves a split empty, by position
instead (the last items held out), said through the "resstream" logger.
"""

from __future__ import annotations

import codecs
import contextlib
import functools
import logging
import math
import sysconfig
import zlib
from pathlib import Path

STDLIB = "stdlib"
SPLITS = ("train", "validation")
TEXT_SUFFIXES = (".txt", ".md", ".py", ".text")
JSON_SUFFIXES = (".jsonl", ".json")
PARQUET_SUFFIXES = (".parquet",)

log = logging.getLogger("resstream")
_announced: set[str] = set()


class DataError(ValueError):
    """The data could not be found, read or used."""


def _in_validation(key: str, validation_fraction: float) -> bool:
    """A stable, machine-independent coin: the CRC32 of a file path or document key."""
    return zlib.crc32(key.encode("utf-8")) % 10_000 < validation_fraction * 10_000


def stdlib_root() -> Path:
    """The running interpreter's standard-library directory."""
    return Path(sysconfig.get_paths()["stdlib"])


def stdlib_files() -> list[Path]:
    """The interpreter's standard-library sources, sorted: site-packages excluded, and the few
    files that are not UTF-8 (encoding fixtures of the test suite, such as
    test/encoded_modules/module_iso_8859_1.py) left out."""
    files = [p for p in _stdlib_candidates() if _is_utf8(p)]
    if not files:
        raise DataError(f"no standard-library sources under {stdlib_root()}: pass a local corpus with data.source=PATH")
    return files


@functools.cache  # listing the tree takes a second or two; a process (a study of many runs) lists it once
def _stdlib_candidates() -> tuple[Path, ...]:
    """The standard library's .py files, site-packages excluded (listed, not read)."""
    root = stdlib_root()
    return tuple(sorted(p for p in root.rglob("*.py") if "site-packages" not in p.relative_to(root).parts))


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
    validation = split == "validation"
    if source == STDLIB:
        root = stdlib_root()
        chosen = [
            p for p in stdlib_files() if _in_validation(str(p.relative_to(root)), validation_fraction) == validation
        ]
        texts = [_read_text(p) for p in chosen]
        return datasets.Dataset.from_dict({"text": texts, "path": [str(p.relative_to(root)) for p in chosen]})
    files = _local_files(source)
    if files is None:
        return _hub_dataset(source, split, text_column)
    suffixes = {p.suffix for p in files}
    if len(suffixes) > 1:
        raise DataError(f"{source} mixes file types {sorted(suffixes)}: point at files of one kind")
    suffix = suffixes.pop()
    if len(files) > 1:  # split by file
        flags = _validation_flags([p.name for p in files], validation_fraction, source, "file")
        return _load_files([p for p, v in zip(files, flags, strict=True) if v == validation], suffix, text_column)
    dataset = _load_files(files, suffix, text_column)
    if len(dataset) == 1:  # one document (a text file, or a single record): split by line
        return _split_by_line(dataset, source, validation, validation_fraction)
    flags = _validation_flags([str(i) for i in range(len(dataset))], validation_fraction, source, "document")
    return dataset.select([i for i, v in enumerate(flags) if v == validation])


def _validation_flags(keys: list[str], validation_fraction: float, source: str, unit: str) -> list[bool]:
    """Which items (files or documents, in order) are validation: a hash coin per item, so that adding
    items does not move the others; where the coins leave a split empty (few items, or a small
    fraction), the last max(1, round(n * fraction)) items instead, and say so."""
    flags = [_in_validation(key, validation_fraction) for key in keys]
    if any(flags) and not all(flags):
        return flags
    n = len(keys)  # 2 at least: one file or one document is split by line
    n_validation = _held_out(n, round(n * validation_fraction))
    empty = "train" if all(flags) else "validation"
    _announce(
        f"data: hashing the {n} {unit}s of {source} left the {empty} split empty: split by position instead, "
        f"the last {n_validation} of {n} {unit}s held out for validation"
    )
    return [i >= n - n_validation for i in range(n)]


def _held_out(n: int, wanted: int) -> int:
    """How many of n items to hold out: `wanted`, but at least one, and at least one left for train."""
    return min(n - 1, max(1, wanted))


def _split_by_line(dataset, source: str, validation: bool, validation_fraction: float):
    """One document split at a line boundary: its last ceil(lines * fraction) lines are validation, the
    rest train, so that the two together are the whole text."""
    import datasets

    with _arrow_strings(source):
        row = dataset[0]
    lines = _lines(row["text"] or "")
    if not lines:
        raise DataError(f"{source} is empty: it holds no text; add text, or pass a directory of files")
    if len(lines) < 2:
        raise DataError(
            f"{source} is too small to split into train and validation: it is one document of 1 line; "
            "add text (2 lines at least), or pass a directory of files"
        )
    n_validation = _held_out(len(lines), math.ceil(len(lines) * validation_fraction))
    _announce(
        f"data: {source} is a single document: split by line, the last {n_validation} of {len(lines)} lines "
        f"({n_validation / len(lines):.1%}) held out for validation"
    )
    cut = len(lines) - n_validation
    piece = "".join(lines[cut:] if validation else lines[:cut])
    columns = {key: [value] for key, value in row.items()} | {"text": [piece]}
    return datasets.Dataset.from_dict(columns, dataset.features)


def _lines(text: str) -> list[str]:
    """The lines of a text, each with its "\\n" (the last may lack one). Only "\\n" ends a line, as in
    an editor or `wc -l` (str.splitlines also splits at form feeds and other separators)."""
    parts = text.split("\n")
    return [part + "\n" for part in parts[:-1]] + ([parts[-1]] if parts[-1] else [])


def _announce(message: str) -> None:
    """A warning through the "resstream" logger, once per process: the train and validation splits
    are made by separate calls, and the second would repeat the first."""
    if message not in _announced:
        _announced.add(message)
        log.warning(message)


def _read_text(path: Path) -> str:
    data = path.read_bytes()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as err:
        raise _not_utf8(path, err.start, data[err.start], data.count(b"\n", 0, err.start) + 1) from err


def _not_utf8(path: Path, offset: int, byte: int, line: int) -> DataError:
    return DataError(
        f"{path} is not UTF-8 text: byte 0x{byte:02x} at offset {offset} (line {line}) is not valid UTF-8; "
        "convert it to UTF-8 or remove it from the corpus"
    )


def _scan_text_file(path: Path, chunk_size: int = 1 << 24) -> bool:
    """Check that `path` is UTF-8 (a DataError naming the first bad byte if not), reading it in chunks;
    True when it holds anything but whitespace. Needed before pyarrow's JSON reader, which accepts
    bytes that are not UTF-8 and fails only later, deep in a tokenizing loop."""
    decoder = codecs.getincrementaldecoder("utf-8")()
    offset = newlines = 0  # in the bytes fed to the decoder so far
    content = False
    with path.open("rb") as f:
        while True:
            chunk = f.read(chunk_size)
            pending = len(decoder.getstate()[0])  # the start of a character cut by the previous chunk
            try:
                decoder.decode(chunk, final=not chunk)
            except UnicodeDecodeError as err:  # err.start counts from the pending bytes (never a newline)
                line = newlines + err.object.count(b"\n", 0, err.start) + 1
                raise _not_utf8(path, offset - pending + err.start, err.object[err.start], line) from err
            if not chunk:
                return content
            content = content or bool(chunk.strip())
            offset, newlines = offset + len(chunk), newlines + chunk.count(b"\n")


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
        return datasets.Dataset.from_dict({"text": [_read_text(p) for p in files], "path": names})
    builder = "json" if suffix in JSON_SUFFIXES else "parquet"
    # Checked first: pyarrow reads an empty JSON file as a bare StopIteration, and bytes that are not
    # UTF-8 as strings that fail only when a row is read. (`any` of a list: every file is checked.)
    if builder == "json" and not any([_scan_text_file(p) for p in files]):
        raise _no_records(names, text_column)
    try:
        dataset = datasets.load_dataset(builder, data_files=names, split="train")
    except Exception as err:
        raise DataError(f"could not read {_shorten(names)} as {builder}: {_reason(err)}") from err
    if len(dataset) == 0:
        raise _no_records(names, text_column)
    if text_column not in dataset.column_names:
        raise DataError(
            f"{names[0]} has no column {text_column!r}; its columns are {dataset.column_names}: set data.text_column"
        )
    return dataset.rename_column(text_column, "text") if text_column != "text" else dataset


def _no_records(names: list[str], text_column: str) -> DataError:
    subject = f"{names[0]} holds" if len(names) == 1 else f"the files {_shorten(names)} hold"
    them = "it" if len(names) == 1 else "them"
    return DataError(
        f"{subject} no records: add records with a {text_column!r} field, or remove {them} from the corpus"
    )


def _shorten(names: list[str], at_most: int = 3) -> str:
    """A list of file names for a message: the first few and how many more."""
    return str(names) if len(names) <= at_most else f"{names[:at_most]} and {len(names) - at_most} more"


def _reason(err: BaseException) -> str:
    """An exception and its causes as one line: some (StopIteration, datasets' wrappers) say nothing
    by themselves."""
    parts = []
    while err is not None:
        parts.append(f"{type(err).__name__}: {err}" if str(err) else type(err).__name__)
        err = err.__cause__
    return " <- ".join(parts)


def _hub_dataset(name: str, split: str, text_column: str):
    import datasets

    try:
        dataset = datasets.load_dataset(name, split=split)
    except Exception as err:
        raise DataError(
            f"{name!r} is neither a local path nor a dataset that could be loaded from the hub "
            f"({type(err).__name__}: {err}); offline, use a local file or data.source=stdlib"
        ) from err
    if text_column not in dataset.column_names:
        raise DataError(f"{name} has no column {text_column!r}; its columns are {dataset.column_names}")
    return dataset.rename_column(text_column, "text") if text_column != "text" else dataset


@contextlib.contextmanager
def _arrow_strings(name: str):
    """Arrow decodes a string only when it is read, so text that is not UTF-8 in a file not checked
    beforehand (a parquet file) surfaces where rows are read: turn it into a DataError there."""
    try:
        yield
    except UnicodeDecodeError as err:
        raise DataError(
            f"{name} holds text that is not UTF-8 (byte 0x{err.object[err.start]:02x} at offset {err.start} of a "
            "document): convert it to UTF-8 or remove it from the corpus"
        ) from err
