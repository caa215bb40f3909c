"""Tokenizing benchmark: how fast a split of the corpus is tokenized into the token cache, bytes vs
a byte-level BPE (HuggingFace tokenizers' batch encoding, on every core).

Prints, for the training split of the source (default: the standard-library corpus, the default
data source), the seconds, bytes/s and tokens/s of writing its token cache with each tokenizer, and
the seconds it takes to train the BPE on the same split:

    python benchmarks/tokenizing.py [--source stdlib] [--bpe 4096,16384] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

from resstream.data import STDLIB, ByteTokenizer, _write_tokens, load_documents
from resstream.tokenizer import train_bpe


def tokenize(documents, tokenizer, name: str) -> dict[str, float]:
    """Time `_write_tokens` (what `tokenized_corpus` does on a cache miss) into a scratch file."""
    with tempfile.TemporaryDirectory() as scratch:
        path = Path(scratch) / "tokens.bin"
        start = time.perf_counter()
        _write_tokens(documents, tokenizer, path, name)
        seconds = time.perf_counter() - start
        tokens = path.stat().st_size // tokenizer.encode("a").itemsize
    n_bytes = sum(len(t.encode("utf-8")) for t in documents["text"] if t is not None)
    return {
        "seconds": seconds,
        "bytes": n_bytes,
        "tokens": tokens,
        "bytes_per_s": n_bytes / seconds,
        "tokens_per_s": tokens / seconds,
        "bytes_per_token": n_bytes / tokens,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--source", default=STDLIB, help="a data source (data.source); default: stdlib")
    parser.add_argument("--bpe", default="4096", help="comma-separated BPE vocabulary sizes")
    parser.add_argument("--json", default=None, help="also write the results to this file")
    args = parser.parse_args()

    documents = load_documents(args.source, "train")
    name = f"the train split of {args.source}"
    print(f"{name}: {len(documents)} documents; {os.cpu_count()} cores")
    results = {"bytes": tokenize(documents, ByteTokenizer(), name)}
    for n in [int(v) for v in args.bpe.split(",")]:
        start = time.perf_counter()
        tokenizer = train_bpe((t for t in documents["text"] if t), n)
        trained = time.perf_counter() - start
        results[f"bpe:{n}"] = {**tokenize(documents, tokenizer, name), "train_seconds": trained}
    for key, r in results.items():
        train = f"  (trained in {r['train_seconds']:.1f} s)" if "train_seconds" in r else ""
        print(
            f"{key:>10}: {r['seconds']:7.2f} s  {r['bytes_per_s'] / 1e6:7.2f} MB/s  "
            f"{r['tokens_per_s'] / 1e6:7.3f} M tokens/s  {r['tokens']:>11,} tokens  "
            f"{r['bytes_per_token']:.2f} bytes/token{train}"
        )
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
