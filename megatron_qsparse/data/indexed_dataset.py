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
    """Smallest dtype Megatron uses for token ids of a vocabulary: uint16 up to 65535, else int32."""
    if vocab_size is not None and vocab_size <= 65535:
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


def apply_default_permissions(fd: int) -> None:
    """Give a ``tempfile.mkstemp`` file (mode 0600) the usual ``0666 & ~umask`` permissions.

    Used before renaming a temporary file into place, so shared datasets stay readable.
    """
    umask = os.umask(0)
    os.umask(umask)
    os.fchmod(fd, 0o666 & ~umask)


def _fsync(f) -> None:
    f.flush()
    os.fsync(f.fileno())


class IndexedDatasetBuilder:
    """Writes a Megatron-compatible ``PREFIX.bin``/``PREFIX.idx`` pair.

    Add sequences with :meth:`add_document` (one sequence per document, the GPT case) or with
    :meth:`add_item` followed by :meth:`end_document` (several sequences per document); append
    another finished dataset with :meth:`add_index`; then call :meth:`finalize`. Nothing appears
    under the final names before :meth:`finalize`; :meth:`abort` removes the temporary file.

    Used as a context manager the builder finalizes on a clean exit and aborts on an exception::

        with IndexedDatasetBuilder("out/corpus_text_document", np.uint16) as builder:
            for ids in documents:
                builder.add_document(ids)

    Args:
        prefix: output path without extension.
        dtype: token dtype, one of :data:`DTYPE_CODES` (see :func:`best_token_dtype`).
    """

    _FLUSH_EVERY = 1 << 20

    def __init__(self, prefix: str, dtype=np.int32):
        self.prefix = str(prefix)
        self.dtype = np.dtype(dtype)
        self._code = _dtype_code(self.dtype)
        directory = os.path.dirname(os.path.abspath(self.prefix))
        if not os.path.isdir(directory):
            raise ValueError(f"output directory {directory!r} does not exist; create it first")
        base = os.path.basename(self.prefix)
        fd, self._tmp_bin = tempfile.mkstemp(prefix=f".{base}.bin.", suffix=".tmp", dir=directory)
        apply_default_permissions(fd)
        self._bin = os.fdopen(fd, "wb")
        # Recent lengths / document boundaries are python lists; they are moved into numpy chunks
        # (_extra_*) every _FLUSH_EVERY sequences and on add_index, to bound memory.
        self._lengths: list[int] = []
        self._document_indices: list[int] = [0]
        self._extra_lengths: list[np.ndarray] = []
        self._extra_doc_indices: list[np.ndarray] = []
        self._num_sequences = 0
        self._done = False

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

    def add_item(self, tokens: Sequence[int] | np.ndarray) -> None:
        """Append one sequence to the current document (close it with :meth:`end_document`)."""
        self._check_open()
        arr = self._as_tokens(tokens)
        if arr.size > np.iinfo(np.int32).max:
            raise ValueError(f"sequence of {arr.size} tokens exceeds the int32 length field")
        self._bin.write(arr.tobytes(order="C"))
        self._lengths.append(int(arr.size))
        self._num_sequences += 1
        if len(self._lengths) >= self._FLUSH_EVERY:
            self._flush_small_lists()

    def end_document(self) -> None:
        """Close the current document (all sequences added since the previous one)."""
        self._check_open()
        self._document_indices.append(self._num_sequences)

    def add_document(self, tokens: Sequence[int] | np.ndarray) -> None:
        """Append a document made of exactly one sequence."""
        self.add_item(tokens)
        self.end_document()

    def add_index(self, other_prefix: str) -> None:
        """Append every sequence and document of the finished dataset ``other_prefix``.

        Used to merge shards produced in parallel. The dtypes must match. Any sequences added
        since the last :meth:`end_document` are closed into a document first.
        """
        self._check_open()
        other = IndexedDataset(other_prefix)
        if other.dtype != self.dtype:
            raise ValueError(f"cannot merge {other_prefix!r} (dtype {other.dtype.name}) into "
                             f"{self.prefix!r} (dtype {self.dtype.name}); re-run "
                             f"tools/preprocess_data.py with the same tokenizer")
        if self._document_indices[-1] != self._num_sequences:
            self.end_document()
        self._flush_small_lists()
        offset = self._num_sequences
        self._extra_lengths.append(np.asarray(other.sequence_lengths, dtype=np.int32).copy())
        self._extra_doc_indices.append(
            np.asarray(other.document_indices[1:], dtype=np.int64) + offset)
        self._num_sequences += len(other)
        self._document_indices = [self._num_sequences]
        with open(data_file_path(other_prefix), "rb") as src:
            shutil.copyfileobj(src, self._bin, length=16 << 20)
        del other

    def _flush_small_lists(self) -> None:
        # Move the python lists accumulated so far into the numpy chunks (order is preserved).
        if self._lengths:
            self._extra_lengths.append(np.asarray(self._lengths, dtype=np.int32))
            self._lengths = []
        if len(self._document_indices) > 1 or not self._extra_doc_indices:
            first = not self._extra_doc_indices
            docs = np.asarray(self._document_indices, dtype=np.int64)
            self._extra_doc_indices.append(docs if first else docs[1:])
            self._document_indices = [self._document_indices[-1]]

    # ------------------------------------------------------------------ finishing
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
        if self._document_indices[-1] != self._num_sequences:
            self.end_document()  # Megatron closes a trailing open document the same way
        self._flush_small_lists()
        lengths = (np.concatenate(self._extra_lengths) if self._extra_lengths
                   else np.zeros(0, np.int32))
        docs = np.concatenate(self._extra_doc_indices)
        pointers = np.zeros(len(lengths), dtype=np.int64)
        if len(lengths) > 1:
            np.cumsum(lengths[:-1].astype(np.int64) * self.dtype.itemsize, out=pointers[1:])
        bin_tmp, idx_tmp = self._tmp_bin, None
        try:
            _fsync(self._bin)
            self._bin.close()
            directory = os.path.dirname(os.path.abspath(self.prefix))
            fd, idx_tmp = tempfile.mkstemp(prefix=f".{os.path.basename(self.prefix)}.idx.",
                                           suffix=".tmp", dir=directory)
            apply_default_permissions(fd)
            with os.fdopen(fd, "wb") as f:
                f.write(_HEADER.pack(_MAGIC, _VERSION, self._code, len(lengths), len(docs)))
                f.write(lengths.astype("<i4", copy=False).tobytes(order="C"))
                f.write(pointers.astype("<i8", copy=False).tobytes(order="C"))
                f.write(docs.astype("<i8", copy=False).tobytes(order="C"))
                _fsync(f)
            # Remove a previous index first so that an interruption between the two renames
            # leaves "missing .idx" rather than a new .bin paired with an old .idx.
            if os.path.exists(idx_path):
                os.remove(idx_path)
            os.replace(bin_tmp, data_file_path(self.prefix))
            bin_tmp = None
            os.replace(idx_tmp, idx_path)
            idx_tmp = None
        finally:
            self._done = True
            for leftover in (bin_tmp, idx_tmp):
                if leftover is not None and os.path.exists(leftover):
                    os.remove(leftover)
        logger.info("wrote %s.{bin,idx}: %d sequences, %d documents, %d tokens (%s)", self.prefix,
                    len(lengths), len(docs) - 1, int(lengths.sum(dtype=np.int64)), self.dtype.name)

    def abort(self) -> None:
        """Discard everything written so far; no file is left behind. Safe to call twice."""
        if not self._bin.closed:
            self._bin.close()
        if os.path.exists(self._tmp_bin):
            os.remove(self._tmp_bin)
        self._done = True

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
