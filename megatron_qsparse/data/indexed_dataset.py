"""Megatron-LM compatible memory-mapped indexed dataset (``PREFIX.bin`` + ``PREFIX.idx``).

The ``.bin`` file is the raw token stream (all sequences back to back, one dtype). The ``.idx``
file describes it, byte for byte as ``megatron/core/datasets/indexed_dataset.py`` writes it::

    9 bytes   magic  b"MMIDIDX\\x00\\x00"
    <Q        version (1)
    <B        dtype code (see DTYPE_CODES)
    <Q        sequence count N
    <Q        document-index count M (= number of documents + 1)
    int32[N]  sequence lengths (in tokens)
    int64[N]  byte offset of each sequence in .bin
    int64[M]  document indices: document d is sequences [doc[d], doc[d+1]); doc[0] = 0, doc[-1] = N

Datasets written here are readable by Megatron-LM and vice versa. (Megatron's multimodal datasets
append ``int8[N]`` sequence modes; such files are accepted and the modes ignored.)

Writes are atomic: :class:`IndexedDatasetBuilder` streams to temporary files in the destination
directory and renames them into place only in :meth:`IndexedDatasetBuilder.finalize`, so a crash
never leaves a half-written pair under the final name.
"""

from __future__ import annotations

import logging
import os
import shutil
import struct
import tempfile
from typing import Iterable, Sequence

import numpy as np

from megatron_qsparse.atomic import apply_default_permissions  # noqa: F401 (re-exported)

logger = logging.getLogger(__name__)

_MAGIC = b"MMIDIDX\x00\x00"
_VERSION = 1
_HEADER = struct.Struct("<9sQBQQ")  # magic, version, dtype code, sequence count, doc-index count

#: Megatron-LM dtype codes stored in the ``.idx`` header.
DTYPE_CODES: dict[int, type] = {
    1: np.uint8,
    2: np.int8,
    3: np.int16,
    4: np.int32,
    5: np.int64,
    6: np.float64,
    7: np.float32,
    8: np.uint16,
}
_CODE_OF = {np.dtype(t): code for code, t in DTYPE_CODES.items()}


def best_token_dtype(vocab_size: int | None) -> type:
    """Token dtype Megatron-LM picks for a vocabulary (``DType.optimal_dtype``).

    uint16 when ``vocab_size < 65500``, int32 otherwise (Megatron keeps a margin below 65536), so a
    dataset written here has the same bytes as Megatron-LM's ``preprocess_data.py`` output.
    """
    if vocab_size is not None and vocab_size < 65500:
        return np.uint16
    return np.int32


def data_file_path(prefix: str) -> str:
    """Path of the ``.bin`` token file of a dataset prefix."""
    return prefix + ".bin"


def index_file_path(prefix: str) -> str:
    """Path of the ``.idx`` index file of a dataset prefix."""
    return prefix + ".idx"


def _dtype_code(dtype) -> int:
    try:
        return _CODE_OF[np.dtype(dtype)]
    except (KeyError, TypeError):
        names = ", ".join(np.dtype(t).name for t in DTYPE_CODES.values())
        raise ValueError(f"unsupported token dtype {dtype!r}; use one of: {names}") from None


def _fsync(f) -> None:
    f.flush()
    os.fsync(f.fileno())


class IndexedDatasetBuilder:
    """Writes a Megatron-compatible ``PREFIX.bin``/``PREFIX.idx`` pair, in bounded memory.

    Add sequences with :meth:`add_document` (one sequence per document, the GPT case; or one
    document of several sequences with ``lengths``, Megatron-LM's signature), with
    :meth:`add_documents` (many single-sequence documents at once, the fast path of
    ``tools/preprocess_data.py``), or with :meth:`add_item` followed by :meth:`end_document`;
    append another finished dataset with :meth:`add_index`; then call :meth:`finalize`.

    Tokens stream to a temporary ``.bin``; sequence lengths and document boundaries stream to two
    temporary side files, and :meth:`finalize` assembles the ``.idx`` from them chunk by chunk, so
    memory stays bounded however large the dataset (Megatron-LM keeps them in Python lists).
    Nothing appears under the final names before :meth:`finalize`; :meth:`abort` removes every
    temporary file.

    Used as a context manager the builder finalizes on a clean exit and aborts on an exception::

        with IndexedDatasetBuilder("out/corpus_text_document", np.uint16) as builder:
            for ids in documents:
                builder.add_document(ids)

    Args:
        prefix: output path without extension.
        dtype: token dtype, one of :data:`DTYPE_CODES` (see :func:`best_token_dtype`).
    """

    _FLUSH_EVERY = 1 << 16  # buffered lengths / boundaries before a write to the side files
    _CHUNK = 1 << 22  # entries per chunk when assembling the index or appending another one

    def __init__(self, prefix: str, dtype=np.int32):
        self.prefix = str(prefix)
        self.dtype = np.dtype(dtype)
        self._code = _dtype_code(self.dtype)
        self._dir = os.path.dirname(os.path.abspath(self.prefix))
        if not os.path.isdir(self._dir):
            raise ValueError(f"output directory {self._dir!r} does not exist; create it first")
        self._done = False
        self._tmp: dict[str, str] = {}
        self._files = {}
        try:
            for part in ("bin", "lengths", "documents"):
                fd, path = tempfile.mkstemp(prefix=f".{os.path.basename(self.prefix)}.{part}.",
                                            suffix=".tmp", dir=self._dir)
                self._tmp[part] = path
                if part == "bin":
                    apply_default_permissions(fd)
                self._files[part] = os.fdopen(fd, "wb")
        except BaseException:
            self.abort()
            raise
        self._bin = self._files["bin"]
        self._len_buf: list[int] = []
        self._doc_buf: list[int] = [0]  # the document index starts at 0
        self._num_sequences = 0
        self._num_doc_entries = 1
        self._last_boundary = 0  # last value appended to the document index
        self._num_tokens = 0

    # ------------------------------------------------------------------ adding data
    def _as_tokens(self, tokens) -> np.ndarray:
        arr = np.asarray(tokens)
        if arr.ndim != 1:
            raise ValueError(f"a sequence must be 1-D, got shape {arr.shape}")
        if arr.dtype != self.dtype and arr.size and np.issubdtype(self.dtype, np.integer):
            if not np.issubdtype(arr.dtype, np.integer):
                raise ValueError(f"token ids must be integers, got dtype {arr.dtype}")
            info = np.iinfo(self.dtype)
            lo, hi = int(arr.min()), int(arr.max())
            if lo < info.min or hi > info.max:
                raise ValueError(f"token id range [{lo}, {hi}] does not fit dtype {self.dtype.name}; "
                                 f"build with a wider dtype (best_token_dtype(vocab_size))")
        return arr.astype(self.dtype, copy=False)

    def _check_open(self) -> None:
        if self._done:
            raise RuntimeError(f"builder for {self.prefix!r} is already finalized or aborted")

    def _flush_buffers(self) -> None:
        if self._len_buf:
            self._files["lengths"].write(np.asarray(self._len_buf, dtype="<i4").tobytes())
            self._len_buf = []
        if self._doc_buf:
            self._files["documents"].write(np.asarray(self._doc_buf, dtype="<i8").tobytes())
            self._doc_buf = []

    def _write_tokens(self, arr: np.ndarray) -> None:
        self._bin.write(arr.tobytes(order="C"))
        self._num_tokens += int(arr.size)

    def add_item(self, tokens: Sequence[int] | np.ndarray) -> None:
        """Append one sequence to the current document (close it with :meth:`end_document`)."""
        self._check_open()
        arr = self._as_tokens(tokens)
        if arr.size > np.iinfo(np.int32).max:
            raise ValueError(f"sequence of {arr.size} tokens exceeds the int32 length field")
        self._write_tokens(arr)
        self._len_buf.append(int(arr.size))
        self._num_sequences += 1
        if len(self._len_buf) >= self._FLUSH_EVERY:
            self._flush_buffers()

    def end_document(self) -> None:
        """Close the current document (all sequences added since the previous one)."""
        self._check_open()
        self._doc_buf.append(self._num_sequences)
        self._num_doc_entries += 1
        self._last_boundary = self._num_sequences
        if len(self._doc_buf) >= self._FLUSH_EVERY:
            self._flush_buffers()

    def add_document(self, tokens: Sequence[int] | np.ndarray,
                     lengths: Sequence[int] | None = None) -> None:
        """Append one document.

        Args:
            tokens: the document's token ids.
            lengths: ``None`` (the document is one sequence), or the lengths of the sequences it
                is made of, summing to ``len(tokens)`` (Megatron-LM's ``add_document``).
        """
        if lengths is None:
            self.add_item(tokens)
        else:
            arr = self._as_tokens(tokens)
            sizes = [int(n) for n in lengths]
            if sum(sizes) != arr.size or any(n < 0 for n in sizes):
                raise ValueError(f"lengths {sizes} do not split a document of {arr.size} tokens")
            start = 0
            for n in sizes:
                self.add_item(arr[start:start + n])
                start += n
        self.end_document()

    def add_documents(self, tokens: np.ndarray, lengths: np.ndarray) -> None:
        """Append ``len(lengths)`` documents of one sequence each, given back to back in ``tokens``.

        Same result as ``add_document`` on each ``tokens[start:start + n]`` in turn, in one write.
        """
        self._check_open()
        arr = self._as_tokens(np.asarray(tokens).reshape(-1))
        sizes = np.asarray(lengths, dtype=np.int64).reshape(-1)
        if sizes.size == 0:
            if arr.size:
                raise ValueError(f"{arr.size} tokens given with no lengths")
            return
        if sizes.min() < 0 or sizes.max() > np.iinfo(np.int32).max:
            raise ValueError("document lengths must be in [0, 2**31 - 1]")
        if int(sizes.sum()) != arr.size:
            raise ValueError(f"lengths sum to {int(sizes.sum())}, but {arr.size} tokens were given")
        if self._last_boundary != self._num_sequences:
            self.end_document()  # close an open add_item document first
        self._flush_buffers()
        self._write_tokens(arr)
        n = sizes.size
        self._files["lengths"].write(sizes.astype("<i4").tobytes())
        self._files["documents"].write(
            np.arange(self._num_sequences + 1, self._num_sequences + n + 1, dtype="<i8").tobytes())
        self._num_sequences += n
        self._num_doc_entries += n
        self._last_boundary = self._num_sequences

    def add_index(self, other_prefix: str) -> None:
        """Append every sequence and document of the finished dataset ``other_prefix``.

        Used to merge shards (``tools/merge_datasets.py``, ``preprocess_data.py --partitions``).
        The dtypes must match. Any sequences added since the last :meth:`end_document` are closed
        into a document first. Memory use is bounded (the index is copied in chunks).
        """
        self._check_open()
        other = IndexedDataset(other_prefix)
        if other.dtype != self.dtype:
            raise ValueError(f"cannot merge {other_prefix!r} (dtype {other.dtype.name}) into "
                             f"{self.prefix!r} (dtype {self.dtype.name}); re-run "
                             f"tools/preprocess_data.py with the same tokenizer")
        if other.has_sequence_modes:
            raise ValueError(f"{index_file_path(other_prefix)} is a multimodal dataset (it has "
                             f"sequence modes), which this builder cannot merge")
        if self._last_boundary != self._num_sequences:
            self.end_document()
        self._flush_buffers()
        offset = self._num_sequences
        lengths, docs = other.sequence_lengths, other.document_indices
        for k in range(0, len(lengths), self._CHUNK):
            self._files["lengths"].write(
                np.asarray(lengths[k:k + self._CHUNK]).astype("<i4").tobytes())
        for k in range(1, len(docs), self._CHUNK):
            part = np.asarray(docs[k:k + self._CHUNK], dtype=np.int64) + offset
            self._files["documents"].write(part.astype("<i8").tobytes())
        self._num_sequences += len(other)
        self._num_doc_entries += len(docs) - 1
        self._last_boundary = self._num_sequences
        self._num_tokens += other.num_tokens
        del other, lengths, docs
        with open(data_file_path(other_prefix), "rb") as src:
            shutil.copyfileobj(src, self._bin, length=16 << 20)

    # ------------------------------------------------------------------ finishing
    def _write_index(self, f) -> None:
        """Header, lengths, pointers and document indices, streamed from the side files."""
        f.write(_HEADER.pack(_MAGIC, _VERSION, self._code, self._num_sequences,
                             self._num_doc_entries))
        with open(self._tmp["lengths"], "rb") as src:
            shutil.copyfileobj(src, f, length=16 << 20)
        itemsize = self.dtype.itemsize
        carry = 0
        with open(self._tmp["lengths"], "rb") as src:
            while True:
                lengths = np.fromfile(src, dtype="<i4", count=self._CHUNK)
                if lengths.size == 0:
                    break
                sizes = lengths.astype(np.int64) * itemsize
                pointers = np.cumsum(sizes) - sizes + carry
                carry = int(pointers[-1] + sizes[-1])
                f.write(pointers.astype("<i8", copy=False).tobytes())
        with open(self._tmp["documents"], "rb") as src:
            shutil.copyfileobj(src, f, length=16 << 20)

    def finalize(self, index_path: str | None = None) -> None:
        """Write the index and atomically move ``.bin`` then ``.idx`` into place.

        Args:
            index_path: accepted for Megatron-LM API compatibility; must be ``None`` or
                ``PREFIX.idx``.
        """
        self._check_open()
        idx_path = index_file_path(self.prefix)
        if index_path is not None and os.path.abspath(index_path) != os.path.abspath(idx_path):
            raise ValueError(f"index_path {index_path!r} must be {idx_path!r}")
        if self._last_boundary != self._num_sequences:
            self.end_document()  # close a trailing add_item document
        idx_tmp = None
        try:
            self._flush_buffers()
            for f in self._files.values():
                _fsync(f)
                f.close()
            fd, idx_tmp = tempfile.mkstemp(prefix=f".{os.path.basename(self.prefix)}.idx.",
                                           suffix=".tmp", dir=self._dir)
            apply_default_permissions(fd)
            with os.fdopen(fd, "wb") as f:
                self._write_index(f)
                _fsync(f)
            # Remove a previous index first so that an interruption between the two renames
            # leaves "missing .idx" rather than a new .bin paired with an old .idx.
            if os.path.exists(idx_path):
                os.remove(idx_path)
            os.replace(self._tmp["bin"], data_file_path(self.prefix))
            del self._tmp["bin"]
            os.replace(idx_tmp, idx_path)
            idx_tmp = None
        finally:
            self._done = True
            self._remove_temporaries(idx_tmp)
        logger.info("wrote %s.{bin,idx}: %d sequences, %d documents, %d tokens (%s)", self.prefix,
                    self._num_sequences, self._num_doc_entries - 1, self._num_tokens,
                    self.dtype.name)

    def _remove_temporaries(self, *extra: str | None) -> None:
        for f in self._files.values():
            if not f.closed:
                try:
                    f.close()  # flushes: fails on a full disk, but closes the file all the same
                except OSError:
                    pass
        for path in list(self._tmp.values()) + list(extra):
            if path is not None:
                try:
                    os.remove(path)
                except FileNotFoundError:
                    pass
        self._tmp = {}

    def abort(self) -> None:
        """Discard everything written so far; no file is left behind. Safe to call twice."""
        self._done = True
        self._remove_temporaries()

    @property
    def num_sequences(self) -> int:
        """Sequences added so far."""
        return self._num_sequences

    @property
    def num_tokens(self) -> int:
        """Tokens added so far."""
        return self._num_tokens

    def __enter__(self) -> "IndexedDatasetBuilder":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            self.abort()
        elif not self._done:
            self.finalize()


class IndexedDataset:
    """Read-only, memory-mapped view of a ``PREFIX.bin``/``PREFIX.idx`` pair.

    ``len(ds)`` is the number of sequences and ``ds[i]`` the tokens of sequence ``i`` (a read-only
    numpy view into the mapped file; ``ds[a:b]`` gives a list). Opening validates the pair and
    raises a one-line :class:`ValueError` naming the file and the fix when it is unusable.
    Pickling reopens the files by path, so the object is cheap to send to DataLoader workers.
    """

    def __init__(self, prefix: str):
        self.prefix = str(prefix)
        self._open()

    # ------------------------------------------------------------------ opening / validation
    def _open(self) -> None:
        prefix = self.prefix
        idx_path, bin_path = index_file_path(prefix), data_file_path(prefix)
        for path in (idx_path, bin_path):
            if not os.path.isfile(path):
                raise ValueError(f"{path}: file not found; create the dataset with "
                                 f"tools/preprocess_data.py (pass its prefix, without .bin/.idx)")
        idx_size = os.path.getsize(idx_path)
        with open(idx_path, "rb") as f:
            head = f.read(_HEADER.size)
        if not (head.startswith(_MAGIC) or (len(head) < len(_MAGIC) and _MAGIC.startswith(head))):
            raise ValueError(f"{idx_path}: bad magic, not a Megatron indexed dataset (.idx); "
                             f"check the path or re-run tools/preprocess_data.py")
        if len(head) < _HEADER.size:
            raise ValueError(f"{idx_path}: truncated index ({idx_size} bytes, header needs "
                             f"{_HEADER.size}); re-run tools/preprocess_data.py")
        _, version, code, num_seq, num_docs = _HEADER.unpack(head)
        if version != _VERSION:
            raise ValueError(f"{idx_path}: unsupported index version {version} (only {_VERSION} "
                             f"is supported); re-run tools/preprocess_data.py")
        if code not in DTYPE_CODES:
            raise ValueError(f"{idx_path}: unknown dtype code {code} (known: "
                             f"{sorted(DTYPE_CODES)}); the file is corrupt, re-run "
                             f"tools/preprocess_data.py")
        self._dtype = np.dtype(DTYPE_CODES[code])
        expected = _HEADER.size + num_seq * (4 + 8) + num_docs * 8
        if idx_size < expected:
            raise ValueError(f"{idx_path}: truncated index ({idx_size} bytes, header promises "
                             f"{expected}); re-run tools/preprocess_data.py")
        if idx_size not in (expected, expected + num_seq):  # + num_seq: multimodal int8 modes
            raise ValueError(f"{idx_path}: {idx_size - expected} unexpected trailing bytes; the "
                             f"file is corrupt, re-run tools/preprocess_data.py")
        if num_docs < 1:
            raise ValueError(f"{idx_path}: empty document index (must start with 0); the file "
                             f"is corrupt, re-run tools/preprocess_data.py")

        self._has_modes = num_seq > 0 and idx_size == expected + num_seq
        self._idx = np.memmap(idx_path, dtype=np.uint8, mode="r")
        off = _HEADER.size
        self._lengths = np.frombuffer(self._idx, dtype="<i4", count=num_seq, offset=off)
        off += 4 * num_seq
        self._pointers = np.frombuffer(self._idx, dtype="<i8", count=num_seq, offset=off)
        off += 8 * num_seq
        self._doc_idx = np.frombuffer(self._idx, dtype="<i8", count=num_docs, offset=off)
        if self._doc_idx[0] != 0 or self._doc_idx[-1] != num_seq:
            raise ValueError(f"{idx_path}: document index runs {self._doc_idx[0]}..."
                             f"{self._doc_idx[-1]}, expected 0...{num_seq}; the file is corrupt, "
                             f"re-run tools/preprocess_data.py")

        bin_size = os.path.getsize(bin_path)
        want = (int(self._pointers[-1]) + int(self._lengths[-1]) * self._dtype.itemsize
                if num_seq else 0)
        if bin_size != want:
            what = "truncated" if bin_size < want else "larger than its index"
            raise ValueError(f"{bin_path}: {what} ({bin_size} bytes, {idx_path} expects {want}); "
                             f"the .bin/.idx pair is truncated or mismatched, re-run "
                             f"tools/preprocess_data.py")
        if bin_size:
            # plain ndarray view of the mapping: slices are cheap read-only views, not memmaps
            self._bin = np.asarray(np.memmap(bin_path, dtype=self._dtype, mode="r"))
        else:
            self._bin = np.zeros(0, dtype=self._dtype)
        self._idx_stat = os.stat(idx_path)

    def __getstate__(self):
        return {"prefix": self.prefix}

    def __setstate__(self, state) -> None:
        self.prefix = state["prefix"]
        self._open()

    # ------------------------------------------------------------------ access
    @staticmethod
    def exists(prefix: str) -> bool:
        """Whether both ``PREFIX.bin`` and ``PREFIX.idx`` exist (not whether they are valid)."""
        return os.path.isfile(index_file_path(prefix)) and os.path.isfile(data_file_path(prefix))

    def __len__(self) -> int:
        return len(self._lengths)

    def __getitem__(self, idx):
        if isinstance(idx, slice):
            return [self.get(i) for i in range(*idx.indices(len(self)))]
        return self.get(idx)

    def get(self, idx: int, offset: int = 0, length: int | None = None) -> np.ndarray:
        """Tokens ``[offset, offset + length)`` of sequence ``idx`` (to its end if ``length`` is None)."""
        n = len(self)
        i = int(idx)
        if i < 0:
            i += n
        if not 0 <= i < n:
            raise IndexError(f"sequence index {idx} out of range for {n} sequences")
        seq_len = int(self._lengths[i])
        if length is None:
            length = seq_len - offset
        if offset < 0 or length < 0 or offset + length > seq_len:
            raise IndexError(f"tokens [{offset}, {offset + length}) out of range for sequence "
                             f"{i} of length {seq_len}")
        start = int(self._pointers[i]) // self._dtype.itemsize + offset
        return self._bin[start:start + length]

    @property
    def dtype(self) -> np.dtype:
        """Token dtype of the ``.bin`` file."""
        return self._dtype

    @property
    def sequence_lengths(self) -> np.ndarray:
        """int32 array: number of tokens of every sequence."""
        return self._lengths

    @property
    def sequence_pointers(self) -> np.ndarray:
        """int64 array: byte offset of every sequence in ``.bin``."""
        return self._pointers

    @property
    def document_indices(self) -> np.ndarray:
        """int64 array of length documents + 1: document ``d`` is sequences ``[doc[d], doc[d+1])``."""
        return self._doc_idx

    @property
    def has_sequence_modes(self) -> bool:
        """Whether the index carries Megatron's multimodal int8 sequence modes (ignored here)."""
        return self._has_modes

    @property
    def num_tokens(self) -> int:
        """Total number of tokens in the dataset."""
        return int(self._lengths.sum(dtype=np.int64))

    @property
    def index_fingerprint(self) -> tuple[str, int, int]:
        """(absolute .idx path, size, mtime in ns): identifies this exact dataset for caches."""
        st = self._idx_stat
        return os.path.abspath(index_file_path(self.prefix)), st.st_size, st.st_mtime_ns

    def __repr__(self) -> str:
        return (f"IndexedDataset({self.prefix!r}, sequences={len(self)}, "
                f"documents={len(self._doc_idx) - 1}, dtype={self._dtype.name})")


def iter_sequences(prefix: str) -> Iterable[np.ndarray]:
    """Yield every sequence of a dataset in order (convenience for tools and tests)."""
    ds = IndexedDataset(prefix)
    for i in range(len(ds)):
        yield ds[i]
