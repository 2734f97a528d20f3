"""Checking and tokenizing documents for ``tools/preprocess_data.py`` (runs in its workers).

A blob of JSON lines (:mod:`.corpus`) or a block of table rows (:mod:`.tables`) becomes token
arrays per ``--json-keys`` key plus the skipped items with their reasons; a row is checked by the
same rules as a parsed line, so the same documents give the same output and the same counts.
"""

from __future__ import annotations

import itertools
import json
from dataclasses import dataclass

import numpy as np

from megatron_qsparse.data.corpus import split_lines
from megatron_qsparse.data.indexed_dataset import best_token_dtype
from megatron_qsparse.data.tables import RowBlock
from megatron_qsparse.data.tokenizer import Tokenizer

# Skip reasons, in the order the summary lists them.
BLANK, BAD_UTF8, BAD_JSON, NOT_OBJECT, MISSING_KEY, NOT_STRING, EMPTY, CORRUPT, BAD_GROUP = (
    "blank line", "invalid UTF-8", "invalid JSON", "not a JSON object", "missing key",
    "non-string value", "empty text", "unreadable compressed file tail",
    "unreadable Parquet row group / Arrow batch")
SKIP_REASONS = (BLANK, BAD_UTF8, BAD_JSON, NOT_OBJECT, MISSING_KEY, NOT_STRING, EMPTY, CORRUPT,
                BAD_GROUP)


@dataclass
class BlobResult:
    """What a worker returns for one blob of lines (or block of table rows)."""

    num_lines: int
    num_bytes: int
    skips: list  # (line / row index in the blob, reason, message)
    tokens: dict  # key -> (concatenated token ids, int32 lengths)


class Encoder:
    """Turns raw input lines into token arrays (one per JSON key), or a skip reason."""

    def __init__(self, json_keys: list[str], tokenizer: Tokenizer, append_eod: bool):
        self.json_keys = list(json_keys)
        self.tokenizer = tokenizer
        self.append_eod = bool(append_eod)
        self.dtype = best_token_dtype(tokenizer.vocab_size)

    def check_line(self, line: bytes) -> tuple[str, str] | dict[str, str]:
        """The texts of ``line`` by key, or ``(reason, message)`` if the line is unusable."""
        if not line.strip():
            return BLANK, "blank line"
        try:
            text = line.decode("utf-8")
        except UnicodeDecodeError as e:
            return BAD_UTF8, f"invalid UTF-8 (byte 0x{line[e.start]:02x} at column {e.start + 1})"
        try:
            obj = json.loads(text.lstrip("\ufeff"))
        except json.JSONDecodeError as e:
            return BAD_JSON, f"invalid JSON ({e.msg} at column {e.colno})"
        except (ValueError, RecursionError) as e:
            return BAD_JSON, f"invalid JSON ({type(e).__name__})"
        if not isinstance(obj, dict):
            return NOT_OBJECT, f"not a JSON object (a {type(obj).__name__})"
        return self.check_values(obj)

    def check_row(self, row: dict, raw_utf8=frozenset()) -> tuple[str, str] | dict[str, str]:
        """:meth:`check_line` for a table row (``raw_utf8``: keys holding undecoded bytes)."""
        for key in raw_utf8:
            value = row[key]
            if isinstance(value, bytes):
                try:
                    row[key] = value.decode("utf-8")
                except UnicodeDecodeError as e:
                    return BAD_UTF8, (f"invalid UTF-8 under {key!r} (byte 0x{value[e.start]:02x} "
                                      f"at offset {e.start})")
        return self.check_values(row)

    def check_values(self, obj: dict) -> tuple[str, str] | dict[str, str]:
        """The texts of a parsed line or a row by key, or ``(reason, message)``."""
        values = {}
        for key in self.json_keys:
            if key not in obj:
                keys = ", ".join(list(obj)[:8]) or "none"
                return MISSING_KEY, f"missing key {key!r} (keys: {keys})"
            value = obj[key]
            if not isinstance(value, str):
                return NOT_STRING, f"non-string value under {key!r} ({type(value).__name__})"
            if not value.strip():
                return EMPTY, f"empty text under {key!r}"
            values[key] = value
        return values

    def encode(self, line: bytes) -> tuple[str | None, dict[str, np.ndarray] | None, int]:
        """One line: ``(skip reason or None, {key: token ids}, number of input bytes)``."""
        checked = self.check_line(line)
        if isinstance(checked, tuple):
            return checked[0], None, len(line)
        return None, {k: np.asarray(self._ids(v), dtype=self.dtype)
                      for k, v in checked.items()}, len(line)

    def _ids(self, text: str) -> list[int]:
        ids = self.tokenizer.tokenize(text)
        if self.append_eod:
            ids.append(self.tokenizer.eod)
        return ids

    def encode_blob(self, blob: bytes) -> BlobResult:
        """All lines of a blob: token ids concatenated per key, plus the skipped lines."""
        return self._encode_checked(map(self.check_line, split_lines(blob)), len(blob))

    def encode_rows(self, block: RowBlock) -> BlobResult:
        """All rows of a Parquet/Arrow block, checked and skipped exactly as lines are."""
        keys = self.json_keys
        rows = (dict(zip(keys, values)) for values in zip(*(block.columns[k] for k in keys)))
        return self._encode_checked((self.check_row(r, block.raw_utf8) for r in rows),
                                    block.num_bytes)

    def encode_task(self, task) -> BlobResult:
        """A blob of JSON lines (``bytes``) or a :class:`RowBlock`."""
        return self.encode_rows(task) if isinstance(task, RowBlock) else self.encode_blob(task)

    def _encode_checked(self, checked_items, num_bytes: int) -> BlobResult:
        skips = []
        ids: dict[str, list[list[int]]] = {k: [] for k in self.json_keys}
        n = 0
        for i, checked in enumerate(checked_items):
            n += 1
            if isinstance(checked, tuple):
                skips.append((i, checked[0], checked[1]))
                continue
            for key, text in checked.items():
                ids[key].append(self._ids(text))
        tokens = {}
        for key, docs in ids.items():
            lengths = np.fromiter(map(len, docs), dtype=np.int32, count=len(docs))
            flat = np.fromiter(itertools.chain.from_iterable(docs), dtype=self.dtype,
                               count=int(lengths.sum(dtype=np.int64)))
            tokens[key] = (flat, lengths)
        return BlobResult(n, num_bytes, skips, tokens)
