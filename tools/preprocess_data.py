#!/usr/bin/env python
"""Tokenize a JSON-lines corpus into Megatron-compatible ``.bin``/``.idx`` datasets.

Example (from the repository root)::

    python tools/preprocess_data.py --input examples/data/kjv_sample.jsonl \\
        --output-prefix data/kjv --tokenizer-type SentencePieceTokenizer \\
        --tokenizer-model examples/data/kjv_sp4k.model --append-eod --workers 2

writes ``data/kjv_text_document.bin`` and ``data/kjv_text_document.idx`` (one file pair per
``--json-keys`` entry, named as Megatron-LM names them); pass ``data/kjv_text_document`` as
``--data-path`` to training. Lines that cannot be used (invalid JSON, missing key, non-string or
empty text) are skipped and counted; the last line on stdout summarises the run.
"""

from __future__ import annotations

import argparse
import gzip
import os
import sys
import time
from collections import Counter
from multiprocessing import Pool

_REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _REPO_ROOT not in sys.path:
    sys.path.insert(0, _REPO_ROOT)

import json  # noqa: E402

import numpy as np  # noqa: E402

from megatron_qsparse.data.indexed_dataset import IndexedDatasetBuilder, best_token_dtype  # noqa: E402
from megatron_qsparse.data.tokenizer import TOKENIZER_TYPES, Tokenizer, build_tokenizer  # noqa: E402

_CHUNKSIZE = 64  # lines per task sent to a worker

# Skip reasons, in the order the summary lists them.
BLANK, BAD_UTF8, BAD_JSON, NOT_OBJECT, MISSING_KEY, NOT_STRING, EMPTY = (
    "blank line", "invalid UTF-8", "invalid JSON", "not a JSON object", "missing key",
    "non-string value", "empty text")
SKIP_REASONS = (BLANK, BAD_UTF8, BAD_JSON, NOT_OBJECT, MISSING_KEY, NOT_STRING, EMPTY)


def get_parser() -> argparse.ArgumentParser:
    """The command-line interface (Megatron-LM flag names)."""
    p = argparse.ArgumentParser(
        description="Tokenize a .jsonl(.gz) corpus into Megatron .bin/.idx datasets.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    g = p.add_argument_group("input data")
    g.add_argument("--input", required=True,
                   help="JSON-lines file, one document per line (.jsonl or .jsonl.gz).")
    g.add_argument("--json-keys", nargs="+", default=["text"],
                   help="Keys to tokenize; one output dataset per key (a line is skipped for all "
                        "keys if any key is unusable).")
    g = p.add_argument_group("tokenizer")
    g.add_argument("--tokenizer-type", default="SentencePieceTokenizer", choices=TOKENIZER_TYPES,
                   help="Tokenizer implementation.")
    g.add_argument("--tokenizer-model", default=None,
                   help="SentencePiece .model file (not needed for ByteTokenizer).")
    g.add_argument("--append-eod", action="store_true",
                   help="Append the end-of-document id to every document.")
    g = p.add_argument_group("output data")
    g.add_argument("--output-prefix", required=True,
                   help="Output path prefix; writes PREFIX_{key}_document.bin/.idx.")
    g = p.add_argument_group("runtime")
    g.add_argument("--workers", type=int, default=1,
                   help="Tokenizer processes (output order is the input order).")
    g.add_argument("--log-interval", type=int, default=1000,
                   help="Print progress to stderr every this many lines (0: never).")
    return p


def open_input(path: str):
    """Open a ``.jsonl`` or ``.jsonl.gz`` file for reading bytes."""
    return gzip.open(path, "rb") if path.endswith(".gz") else open(path, "rb")


class Encoder:
    """Turns one raw input line into token arrays (one per JSON key) or a skip reason."""

    def __init__(self, json_keys: list[str], tokenizer: Tokenizer, append_eod: bool):
        self.json_keys = list(json_keys)
        self.tokenizer = tokenizer
        self.append_eod = bool(append_eod)
        self.dtype = best_token_dtype(tokenizer.vocab_size)

    def encode(self, line: bytes) -> tuple[str | None, dict[str, np.ndarray] | None, int]:
        """Return ``(skip_reason or None, {key: token ids}, number of input bytes)``."""
        nbytes = len(line)
        if not line.strip():
            return BLANK, None, nbytes
        try:
            text = line.decode("utf-8")
        except UnicodeDecodeError:
            return BAD_UTF8, None, nbytes
        try:
            obj = json.loads(text)
        except ValueError:
            return BAD_JSON, None, nbytes
        if not isinstance(obj, dict):
            return NOT_OBJECT, None, nbytes
        values = {}
        for key in self.json_keys:
            if key not in obj:
                return MISSING_KEY, None, nbytes
            value = obj[key]
            if not isinstance(value, str):
                return NOT_STRING, None, nbytes
            if not value.strip():
                return EMPTY, None, nbytes
            values[key] = value
        out = {}
        for key, value in values.items():
            ids = self.tokenizer.tokenize(value)
            if self.append_eod:
                ids.append(self.tokenizer.eod)
            out[key] = np.asarray(ids, dtype=self.dtype)
        return None, out, nbytes


_WORKER: Encoder | None = None


def _init_worker(json_keys, tokenizer_type, tokenizer_model, append_eod) -> None:
    global _WORKER
    _WORKER = Encoder(json_keys, build_tokenizer(tokenizer_type, tokenizer_model), append_eod)


def _encode_in_worker(line: bytes):
    assert _WORKER is not None
    return _WORKER.encode(line)


def output_prefix_for(output_prefix: str, key: str) -> str:
    """Megatron-LM's output naming: ``{output_prefix}_{key}_document``."""
    return f"{output_prefix}_{key}_document"


def _fail(message: str) -> int:
    print(f"error: {message}", file=sys.stderr)
    return 2


def main(argv: list[str] | None = None) -> int:
    """Run the tool; returns the exit status (0 ok, 2 usage/input error)."""
    args = get_parser().parse_args(argv)
    if not os.path.isfile(args.input):
        return _fail(f"--input {args.input!r} not found; give an existing .jsonl or .jsonl.gz file")
    if args.workers < 1:
        return _fail(f"--workers must be at least 1, got {args.workers}")
    if len(set(args.json_keys)) != len(args.json_keys):
        return _fail(f"--json-keys has duplicates: {args.json_keys}")
    try:
        tokenizer = build_tokenizer(args.tokenizer_type, args.tokenizer_model)
    except ValueError as e:
        return _fail(str(e))
    out_dir = os.path.dirname(os.path.abspath(args.output_prefix))
    try:
        os.makedirs(out_dir, exist_ok=True)
    except OSError as e:
        return _fail(f"cannot create output directory {out_dir!r}: {e.strerror}")
    encoder = Encoder(args.json_keys, tokenizer, args.append_eod)
    dtype = encoder.dtype
    print(f"tokenizer {tokenizer.name}: vocab {tokenizer.vocab_size}, eod {tokenizer.eod}, "
          f"dtype {np.dtype(dtype).name}; {args.workers} worker(s)", file=sys.stderr)

    builders: dict[str, IndexedDatasetBuilder] = {}
    skipped: Counter = Counter()
    tokens = Counter()
    docs = lines = total_bytes = 0
    start = time.perf_counter()
    pool = None
    try:
        for key in args.json_keys:
            builders[key] = IndexedDatasetBuilder(output_prefix_for(args.output_prefix, key),
                                                  dtype)
        with open_input(args.input) as fin:
            if args.workers > 1:
                pool = Pool(args.workers, initializer=_init_worker,
                            initargs=(args.json_keys, args.tokenizer_type, args.tokenizer_model,
                                      args.append_eod))
                results = pool.imap(_encode_in_worker, fin, _CHUNKSIZE)
            else:
                results = map(encoder.encode, fin)
            for reason, out, nbytes in results:
                lines += 1
                total_bytes += nbytes
                if reason is not None:
                    skipped[reason] += 1
                else:
                    docs += 1
                    for key, ids in out.items():
                        builders[key].add_document(ids)
                        tokens[key] += len(ids)
                if args.log_interval > 0 and lines % args.log_interval == 0:
                    elapsed = max(time.perf_counter() - start, 1e-9)
                    print(f"processed {lines} lines ({docs} documents) | "
                          f"{lines / elapsed:.0f} docs/s | "
                          f"{total_bytes / elapsed / 1e6:.2f} MB/s", file=sys.stderr)
        if pool is not None:
            pool.close()
            pool.join()
            pool = None
        for builder in builders.values():
            builder.finalize()
    except BaseException:
        for builder in builders.values():
            builder.abort()
        raise
    finally:
        if pool is not None:
            pool.terminate()
            pool.join()

    elapsed = max(time.perf_counter() - start, 1e-9)
    skip_text = ", ".join(f"{r}: {skipped[r]}" for r in SKIP_REASONS if skipped[r]) or "none"
    per_key = ("" if len(args.json_keys) == 1 else
               " (" + ", ".join(f"{k}: {tokens[k]}" for k in args.json_keys) + ")")
    outputs = ", ".join(output_prefix_for(args.output_prefix, k) + ".{bin,idx}"
                        for k in args.json_keys)
    print(f"done: {docs} documents, {sum(tokens.values())} tokens{per_key}, skipped "
          f"{sum(skipped.values())} ({skip_text}) in {elapsed:.2f} s "
          f"({lines / elapsed:.0f} docs/s, {total_bytes / elapsed / 1e6:.2f} MB/s) -> {outputs}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
