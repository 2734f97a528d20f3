"""Reading JSON-lines corpora of any size: input discovery, compressed streams, line-aligned ranges.

Used by ``tools/preprocess_data.py`` and ``tools/train_tokenizer.py``; Parquet and ``datasets``
Arrow input (``tables=True``, preprocess_data only) is read by :mod:`.tables`.

- :func:`expand_inputs` turns ``--input`` values (files, directories of shards, glob patterns)
  into one sorted, de-duplicated list of files, so the order of documents is deterministic.
- :func:`compression_of` tells plain, gzip and zstd files apart by their magic bytes (not their
  names); ``.zst`` needs the optional ``zstandard`` package.
- :func:`plan_partitions` cuts the inputs into ``N`` contiguous, ordered pieces of about equal
  size: uncompressed files are split at byte offsets (each line belongs to the piece holding its
  first byte), compressed files stay whole, tables are cut between row groups / record batches.
- :class:`BlobReader` streams one piece as blobs of whole lines (about 1 MiB each) with the
  number of their first line, so nothing ever holds a whole file in memory.
"""

from __future__ import annotations

import bisect
import glob
import gzip
import os
import re
import zlib
from dataclasses import dataclass
from typing import Iterator, Mapping, Sequence

from megatron_qsparse.data.tables import (
    TABLE_FILE_PATTERN,
    TableInfo,
    TablePiece,
    dataset_folder_files,
    is_dataset_folder,
)

#: File names a directory given as ``--input`` is searched for (case-insensitive).
CORPUS_FILE_PATTERN = re.compile(r"\.(jsonl|json|ndjson)(\.(gz|zst|zstd))?$", re.IGNORECASE)

_GZIP_MAGIC = b"\x1f\x8b"
_ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"
#: The version to install for ``.zst`` input (also the pin in requirements.txt).
ZSTANDARD_REQUIREMENT = "zstandard==0.25.0"


class CorruptInputError(ValueError):
    """A compressed file cannot be decoded past some point (truncated or corrupt stream)."""

    def __init__(self, path: str, line: int, detail: str):
        self.path, self.line, self.detail = path, line, detail
        super().__init__(f"{path}: {detail} after line {line}; the rest of the file is unreadable")


def expand_inputs(specs: Sequence[str], flag: str = "--input", tables: bool = False) -> list[str]:
    """Files named by ``specs``: files as given, directories searched recursively, globs expanded.

    Directories yield the files matching :data:`CORPUS_FILE_PATTERN` (hidden files and folders are
    ignored); each directory's and pattern's files are sorted by path, specs keep their order, and
    a file named twice is read once. With ``tables``, directories also yield ``*.parquet`` files,
    and a ``datasets`` ``save_to_disk`` folder (given, or met while searching) yields its Arrow
    shards in the dataset's order (:func:`.tables.dataset_folder_files`).

    Raises:
        ValueError: a spec that names nothing, or a directory / pattern without corpus files.
    """
    out: list[str] = []
    seen: set[str] = set()
    for spec in specs:
        spec = str(spec)
        if os.path.isfile(spec):
            found = [spec]
        elif os.path.isdir(spec):
            found = _corpus_files_under(spec, tables, flag)
            if not found:
                raise ValueError(f"{flag} {spec!r}: directory holds no .jsonl/.json/.ndjson files "
                                 f"(optionally .gz or .zst)" + (
                                     ", no .parquet files and is no datasets save_to_disk folder"
                                     if tables else ""))
        elif glob.has_magic(spec):
            found = []
            for match in sorted(glob.glob(spec, recursive=True)):
                if os.path.isdir(match):
                    found.extend(_corpus_files_under(match, tables, flag))
                elif os.path.isfile(match):
                    found.append(match)
            if not found:
                raise ValueError(f"{flag} {spec!r}: the pattern matches no files")
        else:
            raise ValueError(f"{flag} {spec!r}: no such file or directory")
        for path in found:
            key = os.path.realpath(path)
            if key not in seen:
                seen.add(key)
                out.append(path)
    if not out:
        raise ValueError(f"{flag}: no input files given")
    return out


def _corpus_files_under(directory: str, tables: bool = False, flag: str = "--input") -> list[str]:
    if tables:
        shards = dataset_folder_files(directory, flag)
        if shards is not None:
            return shards
    found = []
    for root, dirs, files in os.walk(directory):
        dirs[:] = [d for d in dirs if not d.startswith(".")]
        if root != directory and is_dataset_folder(root):
            dirs[:] = []  # a save_to_disk folder inside: its shards in its order, not its .json
            if tables:
                found.append((root + os.sep, dataset_folder_files(root, flag)))
            continue
        found.extend((p, [p]) for p in (os.path.join(root, f) for f in files)
                     if not os.path.basename(p).startswith(".") and (
                         CORPUS_FILE_PATTERN.search(p) or tables and TABLE_FILE_PATTERN.search(p)))
    return [p for _, paths in sorted(found) for p in paths]


def compression_of(path: str) -> str | None:
    """``"gzip"``, ``"zstd"`` or ``None`` (plain), from the file's first bytes."""
    with open(path, "rb") as f:
        head = f.read(4)
    if head.startswith(_GZIP_MAGIC):
        return "gzip"
    if head.startswith(_ZSTD_MAGIC):
        return "zstd"
    return None


def _zstandard():
    try:
        import zstandard
    except ImportError:
        return None
    return zstandard


def open_corpus_file(path: str):
    """Open ``path`` for reading its decompressed bytes.

    Returns:
        ``(stream, raw)``: ``stream.read(n)`` gives decompressed bytes; ``raw`` is the underlying
        file, whose ``tell()`` is the number of (compressed) bytes consumed so far. Close both.

    Raises:
        ValueError: a zstd file while the ``zstandard`` package is missing.
    """
    kind = compression_of(path)
    if kind == "zstd" and _zstandard() is None:
        raise ValueError(f"{path}: reading zstd-compressed input needs the zstandard package; "
                         f"pip install {ZSTANDARD_REQUIREMENT}")
    raw = open(path, "rb")
    if kind is None:
        return raw, raw
    if kind == "gzip":
        return gzip.GzipFile(fileobj=raw, mode="rb"), raw
    return _ZstdStream(raw, _zstandard()), raw


class _ZstdStream:
    """Decompressed bytes of a (possibly multi-frame) zstd file; a truncated frame raises EOFError.

    (``zstandard``'s ``stream_reader`` silently stops at a truncated frame, which would drop the
    rest of a file unnoticed.)
    """

    _READ = 1 << 18  # compressed bytes per read

    def __init__(self, raw, zstd):
        self._raw = raw
        self._dctx = zstd.ZstdDecompressor(max_window_size=1 << 31)
        self._obj = None  # decompressor of the current frame, None between frames
        self._buf = bytearray()
        self._eof = False

    def read(self, n: int) -> bytes:
        while len(self._buf) < n and not self._eof:
            chunk = self._raw.read(self._READ)
            if not chunk:
                if self._obj is not None:
                    raise EOFError("zstd stream ended inside a frame")
                self._eof = True
                break
            while chunk:
                if self._obj is None:
                    self._obj = self._dctx.decompressobj()
                self._buf += self._obj.decompress(chunk)
                if self._obj.eof:
                    chunk, self._obj = self._obj.unused_data, None
                else:
                    chunk = b""
        out = bytes(self._buf[:n])
        del self._buf[:n]
        return out

    def close(self) -> None:
        self._buf = bytearray()


def check_decoders(paths: Sequence[str]) -> None:
    """Raise a clear ValueError now if some file needs a decoder that is not installed (zstd)."""
    if _zstandard() is not None:
        return
    for path in paths:
        if compression_of(path) == "zstd":
            raise ValueError(f"{path}: reading zstd-compressed input needs the zstandard "
                             f"package; pip install {ZSTANDARD_REQUIREMENT}")


def _decode_errors() -> tuple[type[BaseException], ...]:
    errors: list[type[BaseException]] = [EOFError, OSError, zlib.error]
    zstd = _zstandard()
    if zstd is not None:
        errors.append(zstd.ZstdError)
    return tuple(errors)


def count_newlines(path: str, end: int, chunk: int = 16 << 20) -> int:
    """Number of ``\\n`` bytes in ``path[0:end]`` (an uncompressed file), read in chunks."""
    total = 0
    with open(path, "rb") as f:
        remaining = end
        while remaining > 0:
            data = f.read(min(chunk, remaining))
            if not data:
                break
            total += data.count(b"\n")
            remaining -= len(data)
    return total


@dataclass(frozen=True)
class Piece:
    """Bytes ``[start, end)`` of one input file; the lines whose first byte lies in that range.

    ``end=None`` reads to the end of the file. Compressed files are always whole pieces.
    """

    path: str
    start: int = 0
    end: int | None = None


def plan_partitions(paths: Sequence[str], partitions: int,
                    tables: Mapping[str, TableInfo] | None = None) -> list[list]:
    """Cut the concatenated inputs into at most ``partitions`` contiguous parts of similar size.

    Reading the parts one after the other visits every line of every file exactly once, in
    order, so outputs built per part and merged in order equal one built from the whole input.
    Uncompressed files are cut at byte offsets; a compressed file goes whole to the part that
    holds its middle. A table file (a path in ``tables``, with its :class:`.tables.TableInfo`)
    becomes :class:`.tables.TablePiece` objects: each row group / record batch goes to the part
    that holds its middle byte. Empty parts are dropped.
    """
    if partitions < 1:
        raise ValueError(f"partitions must be at least 1, got {partitions}")
    tables = tables or {}
    if partitions == 1:
        return [[TablePiece(p, tables[p]) if p in tables else Piece(p) for p in paths]]
    sizes = [os.path.getsize(p) for p in paths]
    total = sum(sizes)
    bounds = [total * k // partitions for k in range(partitions + 1)]

    def part_of(middle: float) -> int:
        return min(max(bisect.bisect_right(bounds, middle) - 1, 0), partitions - 1)

    parts: list[list] = [[] for _ in range(partitions)]
    pos = 0
    for path, size in zip(paths, sizes):
        if path in tables:
            info, at, first = tables[path], pos, 0
            owners = []
            for _, nbytes in info.groups:
                owners.append(part_of(at + nbytes / 2))
                at += nbytes
            for g in range(1, len(owners) + 1):  # runs of groups with the same owner
                if g == len(owners) or owners[g] != owners[first]:
                    end = None if g == len(owners) else g
                    parts[owners[first]].append(TablePiece(path, info, first, end))
                    first = g
        elif size > 0 and compression_of(path) is None:
            for k in range(partitions):
                lo, hi = max(pos, bounds[k]), min(pos + size, bounds[k + 1])
                if lo < hi:
                    parts[k].append(Piece(path, lo - pos, None if hi == pos + size else hi - pos))
        else:
            parts[part_of(pos + size / 2)].append(Piece(path))
        pos += size
    return [part for part in parts if part]


class BlobReader:
    """Streams one :class:`Piece` as blobs of whole lines.

    Iterating yields ``(first_line, blob)``: ``blob`` holds one or more complete lines (the last
    line of a file may lack its ``\\n``), about ``blob_bytes`` long (longer when a single line
    is), and ``first_line`` is the 1-based number of its first line in the file.
    :attr:`raw_done` / :attr:`raw_total` give the progress in bytes of the file on disk.

    Raises (while iterating):
        CorruptInputError: a compressed stream that is truncated or corrupt; the blobs yielded
            before are good, the incomplete last line is dropped.
    """

    def __init__(self, piece: Piece, blob_bytes: int = 1 << 20):
        self.piece = piece
        self.blob_bytes = int(blob_bytes)
        size = os.path.getsize(piece.path)
        self._end = size if piece.end is None else piece.end
        self.raw_total = self._end - piece.start
        self.raw_done = 0
        self.lines_read = 0

    def __iter__(self) -> Iterator[tuple[int, bytes]]:
        piece = self.piece
        stream, raw = open_corpus_file(piece.path)
        try:
            if stream is not raw and (piece.start or piece.end is not None):
                raise ValueError(f"{piece.path}: a compressed file cannot be split at byte offsets")
            first_line = 1
            pos = 0
            if piece.start > 0:
                raw.seek(piece.start - 1)
                if raw.read(1) != b"\n":
                    raw.readline()  # the line that started before this piece belongs to the last
                pos = raw.tell()
                if pos >= self._end:
                    self.raw_done = self.raw_total
                    return
                first_line = 1 + count_newlines(piece.path, pos)
            yield from self._blobs(stream, raw, pos, first_line)
        finally:
            if stream is not raw:
                stream.close()
            raw.close()

    def _blobs(self, stream, raw, pos: int, line: int) -> Iterator[tuple[int, bytes]]:
        limited = self.piece.end is not None
        errors = _decode_errors()
        rest: list[bytes] = []
        while True:
            n = min(self.blob_bytes, self._end - pos) if limited else self.blob_bytes
            if n <= 0:  # end of the range: finish a line that started inside it
                if rest:
                    rest.append(raw.readline())
                    self.lines_read += 1
                    yield line, b"".join(rest)
                self.raw_done = self.raw_total
                return
            try:
                chunk = stream.read(n)
            except errors as e:
                what = "truncated or corrupt compressed stream"
                raise CorruptInputError(self.piece.path, line - 1,
                                        f"{what} ({type(e).__name__}: {e})") from None
            self.raw_done = raw.tell() - self.piece.start
            if not chunk:
                if rest:
                    self.lines_read += 1
                    yield line, b"".join(rest)
                self.raw_done = self.raw_total
                return
            if limited:
                pos += len(chunk)
            cut = chunk.rfind(b"\n") + 1
            if cut == 0:
                rest.append(chunk)  # a very long line: keep collecting
                continue
            rest.append(chunk[:cut])
            blob = b"".join(rest)
            rest = [chunk[cut:]] if cut < len(chunk) else []
            count = blob.count(b"\n")
            self.lines_read += count
            yield line, blob
            line += count


def split_lines(blob: bytes) -> list[bytes]:
    """The lines of a blob from :class:`BlobReader`, without their ``\\n``."""
    lines = blob.split(b"\n")
    if lines and not lines[-1]:
        lines.pop()
    return lines


def iter_lines(paths: Sequence[str]) -> Iterator[tuple[str, int, bytes]]:
    """Every line of every file (decompressed) as ``(path, line number, bytes without \\n)``."""
    for path in paths:
        for first, blob in BlobReader(Piece(path)):
            for i, line in enumerate(split_lines(blob)):
                yield path, first + i, line
