"""Reading Parquet files and Hugging Face ``datasets`` Arrow folders as corpora, in bounded memory.

Used by ``tools/preprocess_data.py`` next to the JSON-lines reader of :mod:`.corpus`; a row is a
document, a column is what ``--json-keys`` names.

- :func:`table_kind` tells Parquet (``.parquet``, or ``PAR1`` magic) and Arrow IPC files
  (``.arrow``: the *stream* format ``datasets`` writes, or the random-access *file* format) from
  JSON lines.
- :func:`dataset_folder_files` lists the ``data-*.arrow`` shards of a ``save_to_disk`` folder in
  their order (``state.json``), and picks the split of a one-split ``DatasetDict`` folder; the
  ``datasets`` package is not needed.
- :func:`table_info` reads only the metadata (Parquet footer, Arrow message headers through a
  memory map): the columns and the rows and on-disk bytes of every *group* (a Parquet row group,
  an Arrow record batch), the unit that partitions cut at.
- :class:`TableReader` streams one :class:`TablePiece` (a range of groups of one file) as
  :class:`RowBlock` objects of about 1 MiB of text each: plain Python lists of the key columns'
  values, cheap to send to a worker process. Nothing ever holds more than one group's key
  columns (Parquet: one batch of them) in memory.

A group that cannot be decoded (a corrupt page, broken offsets) is reported as one
:class:`RowBlock` with ``error`` set and the next group is read: groups are independent, so the
rows that come out do not depend on how the file is partitioned.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from typing import Iterator, Sequence

#: The version to install for Parquet/Arrow input (also the pin in requirements.txt).
PYARROW_REQUIREMENT = "pyarrow==26.0.1"
#: Table file names a directory given as ``--input`` is searched for (case-insensitive).
TABLE_FILE_PATTERN = re.compile(r"\.parquet$", re.IGNORECASE)

PARQUET, ARROW_STREAM, ARROW_FILE = "parquet", "arrow-stream", "arrow-file"
KIND_NAMES = {PARQUET: "Parquet", ARROW_STREAM: "Arrow", ARROW_FILE: "Arrow"}
_PARQUET_MAGIC = b"PAR1"
_ARROW_FILE_MAGIC = b"ARROW1"
_ARROW_STREAM_MAGIC = b"\xff\xff\xff\xff"  # the continuation marker every IPC message starts with


def pyarrow():
    """The ``pyarrow`` module, or a ValueError saying how to install it."""
    try:
        import pyarrow as pa
        import pyarrow.compute  # noqa: F401
        import pyarrow.ipc  # noqa: F401
        import pyarrow.parquet  # noqa: F401
    except ImportError:
        raise ValueError(f"reading Parquet/Arrow input needs the pyarrow package; "
                         f"pip install {PYARROW_REQUIREMENT}") from None
    return pa


def table_kind(path: str) -> str | None:
    """:data:`PARQUET`, :data:`ARROW_STREAM`, :data:`ARROW_FILE`, or ``None`` (JSON lines).

    ``.parquet`` and ``.arrow`` files are tables whatever their bytes (a broken one is then
    reported as such); other names are tables when they start with a table's magic bytes.
    """
    with open(path, "rb") as f:
        head = f.read(8)
    name = path.lower()
    if head.startswith(_ARROW_FILE_MAGIC):
        return ARROW_FILE
    if name.endswith(".arrow"):
        return ARROW_STREAM
    if name.endswith(".parquet") or head.startswith(_PARQUET_MAGIC):
        return PARQUET
    if head.startswith(_ARROW_STREAM_MAGIC):
        return ARROW_STREAM
    return None


def is_dataset_folder(directory: str) -> bool:
    """Whether ``directory`` is a ``datasets`` ``save_to_disk`` folder (Dataset or DatasetDict)."""
    def has(name: str) -> bool:
        return os.path.isfile(os.path.join(directory, name))

    return has("dataset_dict.json") or has("state.json") and has("dataset_info.json")


def dataset_folder_files(directory: str, flag: str = "--input") -> list[str] | None:
    """The Arrow shards of a ``datasets`` ``save_to_disk`` folder in order, or ``None`` if it is
    not one.

    A ``DatasetDict`` folder (``dataset_dict.json`` and one folder per split) with a single split
    reads that split; with several it is an error naming them, since which to read is the user's
    choice (pass the split's folder, e.g. ``DIR/train``).

    Raises:
        ValueError: a ``DatasetDict`` with several splits, or a folder missing a listed shard.
    """
    dict_json = os.path.join(directory, "dataset_dict.json")
    if os.path.isfile(dict_json):
        try:
            with open(dict_json, encoding="utf-8") as f:
                splits = list(json.load(f)["splits"])
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise ValueError(f"{flag} {directory!r}: unreadable dataset_dict.json ({e}); "
                             f"pass one split's folder instead") from None
        if len(splits) != 1:
            names = ", ".join(map(str, splits)) or "none"
            example = os.path.join(directory, "train" if "train" in splits else str(splits[0])) \
                if splits else os.path.join(directory, "SPLIT")
            raise ValueError(f"{flag} {directory!r}: a datasets DatasetDict with splits {names}; "
                             f"pass the folder of the split to read, e.g. {flag} {example}")
        found = dataset_folder_files(os.path.join(directory, str(splits[0])), flag)
        if found is None:
            raise ValueError(f"{flag} {directory!r}: split folder {splits[0]!r} is not a "
                             f"datasets save_to_disk folder (no state.json, dataset_info.json)")
        return found
    if not is_dataset_folder(directory):
        return None
    state_json = os.path.join(directory, "state.json")
    try:
        with open(state_json, encoding="utf-8") as f:
            names = [entry["filename"] for entry in json.load(f)["_data_files"]]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ValueError(f"{flag} {directory!r}: unreadable state.json of a datasets "
                         f"save_to_disk folder ({type(e).__name__}: {e})") from None
    files = [os.path.join(directory, name) for name in names]
    for path in files:
        if not os.path.isfile(path):
            raise ValueError(f"{flag} {directory!r}: shard {os.path.basename(path)} listed in "
                             f"state.json is missing; save the dataset again")
    if not files:
        raise ValueError(f"{flag} {directory!r}: the datasets folder lists no data files")
    return files


@dataclass(frozen=True)
class TableInfo:
    """What the metadata of one table file says."""

    kind: str
    columns: dict  # name -> Arrow type (as text)
    groups: tuple  # (rows, on-disk bytes) per group; the bytes add up to the file size

    @property
    def rows(self) -> int:
        return sum(r for r, _ in self.groups)


def _detail(e: BaseException, limit: int = 300) -> str:
    """``Type: message`` on one line (pyarrow's messages span several), cut to ``limit``."""
    text = f"{type(e).__name__}: {' '.join(str(e).split())}"
    return text if len(text) <= limit else text[:limit - 3] + "..."


def _corrupt(path: str, kind: str, e: BaseException) -> ValueError:
    what = "Parquet" if kind == PARQUET else "Arrow IPC"
    return ValueError(f"{path}: not a readable {what} file ({_detail(e)}); "
                      f"re-create or re-download it, or leave it out of --input")


def _scaled(weights: Sequence[int], total: int) -> tuple:
    """Integer weights scaled to add up to ``total`` (the file size), in order."""
    s = sum(weights)
    if not weights:
        return ()
    if s <= 0:
        weights, s = [1] * len(weights), len(weights)
    cum, out, prev = 0, [], 0
    for w in weights:
        cum += w
        edge = total * cum // s
        out.append(edge - prev)
        prev = edge
    return tuple(out)


def table_info(path: str, kind: str, keys: Sequence[str] = ()) -> TableInfo:
    """The columns and groups of a table file, from its metadata only.

    Raises:
        ValueError: an unreadable file (one line naming it), or a column of ``keys`` it lacks
            (naming the columns it has).
    """
    pa = pyarrow()
    size = os.path.getsize(path)
    try:
        if kind == PARQUET:
            pf = pa.parquet.ParquetFile(path)
            meta, schema = pf.metadata, pf.schema_arrow
            groups = [meta.row_group(g) for g in range(meta.num_row_groups)]
            rows = [g.num_rows for g in groups]
            weights = [sum(g.column(c).total_compressed_size for c in range(g.num_columns))
                       for g in groups]
        else:
            with pa.memory_map(path) as source:  # headers only: the buffers are never touched
                if kind == ARROW_FILE:
                    reader = pa.ipc.open_file(source)
                    batches = (reader.get_batch(i) for i in range(reader.num_record_batches))
                else:
                    reader = pa.ipc.open_stream(source)
                    batches = iter(reader)
                schema = reader.schema
                rows, weights = [], []
                for batch in batches:
                    rows.append(batch.num_rows)
                    weights.append(batch.get_total_buffer_size())
    except (OSError, ValueError, pa.ArrowException) as e:  # ArrowInvalid is a ValueError
        raise _corrupt(path, kind, e) from None
    columns = {f.name: str(f.type) for f in schema}
    for key in keys:
        if key not in columns:
            names = ", ".join(list(columns)[:12]) or "none"
            raise ValueError(f"{path}: no column {key!r} (columns: {names}); pass --json-keys "
                             f"with the column(s) holding the text")
    return TableInfo(kind, columns, tuple(zip(rows, _scaled(weights, size))))


@dataclass(frozen=True)
class TablePiece:
    """Groups ``[start, start + len(groups))`` of one table file (all of them by default)."""

    path: str
    info: TableInfo
    start: int = 0
    end: int | None = None

    @property
    def groups(self) -> tuple:
        return self.info.groups[self.start:self.end]

    @property
    def first_row(self) -> int:
        return sum(r for r, _ in self.info.groups[:self.start])


@dataclass
class RowBlock:
    """Rows ``[first_row, first_row + num_rows)`` of a file (0-based): the key columns' values.

    ``columns[key]`` is a list of Python values (``str``, ``None``, numbers, ...); for a key in
    ``raw_utf8`` they are the ``bytes`` of a string column that is not valid UTF-8, to be decoded
    row by row. ``num_bytes`` is the UTF-8 size of the block's text. A block with ``error`` set
    stands for an unreadable group and holds no rows.
    """

    first_row: int
    num_rows: int
    columns: dict = field(default_factory=dict)
    raw_utf8: frozenset = frozenset()
    num_bytes: int = 0
    error: str | None = None


def _is_text(pa, t) -> bool:
    return pa.types.is_string(t) or pa.types.is_large_string(t) or pa.types.is_string_view(t)


class TableReader:
    """Streams one :class:`TablePiece` as :class:`RowBlock` objects of about ``block_bytes`` of
    text; :attr:`raw_done` / :attr:`raw_total` give the progress in on-disk bytes."""

    def __init__(self, piece: TablePiece, keys: Sequence[str], block_bytes: int = 1 << 20):
        self.piece, self.keys, self.block_bytes = piece, list(keys), int(block_bytes)
        self.raw_total = sum(b for _, b in piece.groups)
        self.raw_done = 0

    def __iter__(self) -> Iterator[RowBlock]:
        pa = pyarrow()
        piece = self.piece
        unit = "row group" if piece.info.kind == PARQUET else "record batch"
        groups = self._groups(pa)
        try:
            yield from self._read(pa, groups, unit)
        finally:
            groups.close()  # release the file (or memory map) now, not when collected

    def _read(self, pa, groups, unit: str) -> Iterator[RowBlock]:
        piece = self.piece
        row = piece.first_row
        for g, (rows, nbytes) in enumerate(piece.groups, start=piece.start):
            try:
                batches = next(groups)
            except (StopIteration, OSError, ValueError, pa.ArrowException) as e:  # file changed
                raise _corrupt(piece.path, piece.info.kind, e) from None
            before, done = self.raw_done, 0
            try:
                for batch in batches:
                    for block in self._blocks(pa, self._checked(pa, batch), row + done):
                        done += block.num_rows
                        self.raw_done = before + nbytes * done // max(rows, 1)
                        yield block
            except (OSError, ValueError, pa.ArrowException) as e:
                yield RowBlock(row + done, 0, error=(
                    f"{piece.path}: {unit} {g} (rows {row}-{row + rows - 1}) is unreadable "
                    f"({_detail(e)})"))
            row += rows
            self.raw_done = before + nbytes

    def _groups(self, pa) -> Iterator[Iterator]:
        """One iterator of record batches (key columns only) per group of the piece, lazily."""
        piece = self.piece
        stop = piece.start + len(piece.groups)
        if piece.info.kind == PARQUET:
            # buffer_size: stream column chunks page by page instead of reading them whole
            pf = pa.parquet.ParquetFile(piece.path, buffer_size=1 << 20)
            try:
                for g in range(piece.start, stop):
                    rows, _ = piece.info.groups[g]
                    meta = pf.metadata.row_group(g)
                    per_row = max(1, meta.total_byte_size // max(rows, 1))
                    batch_rows = int(min(max(4 * self.block_bytes // per_row, 1), 1 << 16))
                    yield pf.iter_batches(batch_size=batch_rows, row_groups=[g],
                                          columns=self.keys, use_threads=False)
            finally:
                pf.close()
            return
        with pa.memory_map(piece.path) as source:
            if piece.info.kind == ARROW_FILE:
                reader = pa.ipc.open_file(source)
                for g in range(piece.start, stop):
                    yield iter([reader.get_batch(g).select(self.keys)])
            else:
                reader = pa.ipc.open_stream(source)
                for g, batch in enumerate(reader):  # earlier batches: headers only (memory map)
                    if g >= stop:
                        break
                    if g >= piece.start:
                        yield iter([batch.select(self.keys)])

    @staticmethod
    def _checked(pa, batch):
        """``batch`` if its buffers are sound; invalid UTF-8 alone is left to the row checks."""
        try:
            batch.validate(full=True)
        except pa.ArrowInvalid:
            binary = [c.cast(pa.binary()) if _is_text(pa, c.type) else c for c in batch.columns]
            pa.RecordBatch.from_arrays(binary, names=batch.schema.names).validate(full=True)
        return batch

    def _blocks(self, pa, batch, first_row: int) -> Iterator[RowBlock]:
        """``batch`` cut into blocks of about ``block_bytes`` of text (at least one row each)."""
        import numpy as np

        n = batch.num_rows
        if n == 0:
            return
        if any(pa.types.is_dictionary(t) for t in batch.schema.types):  # categorical text
            batch = pa.RecordBatch.from_arrays(
                [c.dictionary_decode() if pa.types.is_dictionary(c.type) else c
                 for c in batch.columns], names=batch.schema.names)
        sizes = np.zeros(n, np.int64)
        text = np.zeros(n, np.int64)
        for col in batch.columns:
            if _is_text(pa, col.type) or pa.types.is_binary(col.type):
                lengths = pa.compute.binary_length(col).fill_null(0)
                lengths = lengths.to_numpy(zero_copy_only=False).astype(np.int64)
                sizes += lengths
                if _is_text(pa, col.type):
                    text += lengths
            else:
                sizes += max(1, col.nbytes // n)
        cum = np.cumsum(sizes)
        start = 0
        while start < n:
            base = int(cum[start - 1]) if start else 0
            end = int(np.searchsorted(cum, base + self.block_bytes, side="left")) + 1
            end = min(max(end, start + 1), n)
            part = batch.slice(start, end - start)
            columns, raw = {}, set()
            for key in self.keys:
                col = part.column(key)
                try:
                    columns[key] = col.to_pylist()
                except UnicodeDecodeError:  # a string column that is not UTF-8: check per row
                    columns[key] = col.cast(pa.binary()).to_pylist()
                    raw.add(key)
            yield RowBlock(first_row + start, end - start, columns, frozenset(raw),
                           int(text[start:end].sum()))
            start = end
