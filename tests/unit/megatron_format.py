"""An independent reader and writer of Megatron-LM's mmap indexed format, for tests.

Written with ``struct`` only, straight from the specification (``megatron/core/datasets/
indexed_dataset.py``, summarised in /work/shared/VERIFIED.md), sharing no code with
``megatron_qsparse.data.indexed_dataset``:

    .idx: b"MMIDIDX\\x00\\x00", <Q version 1, <B dtype code, <Q sequence count N,
          <Q document-index count M, int32[N] lengths, int64[N] byte pointers into .bin,
          int64[M] document indices (0, ..., N)
    .bin: every sequence's tokens back to back, little-endian, in the dtype of the code
"""

from __future__ import annotations

import struct

#: dtype code -> (struct format character, item size)
SPEC_DTYPES = {1: ("B", 1), 2: ("b", 1), 3: ("h", 2), 4: ("i", 4), 5: ("q", 8), 6: ("d", 8),
               7: ("f", 4), 8: ("H", 2)}
MAGIC = b"MMIDIDX\x00\x00"


def parse_idx(data: bytes) -> dict:
    """Fields of an ``.idx`` file; asserts the layout holds exactly (no trailing bytes)."""
    assert data[:9] == MAGIC, "bad magic"
    (version,) = struct.unpack_from("<Q", data, 9)
    (code,) = struct.unpack_from("<B", data, 17)
    (n,) = struct.unpack_from("<Q", data, 18)
    (m,) = struct.unpack_from("<Q", data, 26)
    off = 34
    lengths = list(struct.unpack_from(f"<{n}i", data, off))
    off += 4 * n
    pointers = list(struct.unpack_from(f"<{n}q", data, off))
    off += 8 * n
    documents = list(struct.unpack_from(f"<{m}q", data, off))
    off += 8 * m
    assert off == len(data), f"{len(data) - off} trailing bytes"
    return {"version": version, "code": code, "lengths": lengths, "pointers": pointers,
            "documents": documents}


def read_dataset(prefix: str) -> tuple[dict, list[list]]:
    """``(index fields, token lists of every sequence)`` of ``prefix.idx`` / ``prefix.bin``."""
    with open(prefix + ".idx", "rb") as f:
        index = parse_idx(f.read())
    with open(prefix + ".bin", "rb") as f:
        data = f.read()
    fmt, size = SPEC_DTYPES[index["code"]]
    sequences = [list(struct.unpack_from(f"<{n}{fmt}", data, p))
                 for n, p in zip(index["lengths"], index["pointers"])]
    if index["lengths"]:
        assert len(data) == index["pointers"][-1] + index["lengths"][-1] * size
    return index, sequences


def megatron_bytes(documents: list[list[list[int]]], code: int) -> tuple[bytes, bytes]:
    """``(.idx bytes, .bin bytes)`` Megatron-LM's ``IndexedDatasetBuilder`` writes for
    ``documents`` (each a list of sequences, each a list of token ids) added with
    ``add_document`` one by one, then ``finalize``."""
    fmt, size = SPEC_DTYPES[code]
    lengths, doc_index, bin_parts = [], [0], []
    for doc in documents:
        for seq in doc:
            bin_parts.append(struct.pack(f"<{len(seq)}{fmt}", *seq))
            lengths.append(len(seq))
        doc_index.append(len(lengths))
    pointers, current = [], 0
    for n in lengths:
        pointers.append(current)
        current += n * size
    idx = (MAGIC + struct.pack("<Q", 1) + struct.pack("<B", code)
           + struct.pack("<Q", len(lengths)) + struct.pack("<Q", len(doc_index))
           + struct.pack(f"<{len(lengths)}i", *lengths)
           + struct.pack(f"<{len(pointers)}q", *pointers)
           + struct.pack(f"<{len(doc_index)}q", *doc_index))
    return idx, b"".join(bin_parts)
