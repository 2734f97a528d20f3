"""Megatron-compatible .bin/.idx reader and builder: layout, round trips, validation, atomicity."""

import os
import pickle
import struct

import numpy as np
import pytest

from megatron_qsparse.data.indexed_dataset import (
    DTYPE_CODES,
    IndexedDataset,
    IndexedDatasetBuilder,
    best_token_dtype,
)
from tests.unit.megatron_format import megatron_bytes, read_dataset


def _write(prefix, docs, dtype):
    builder = IndexedDatasetBuilder(str(prefix), dtype)
    for d in docs:
        builder.add_document(d)
    builder.finalize()
    return IndexedDataset(str(prefix))


def _files(directory):
    return sorted(os.listdir(directory))


@pytest.mark.parametrize("dtype,vocab", [(np.uint16, 65499), (np.int32, 65500)])
def test_round_trip(tmp_path, dtype, vocab):
    # Megatron-LM's DType.optimal_dtype: uint16 below 65500, int32 from there on
    assert best_token_dtype(vocab) is dtype
    assert best_token_dtype(4096) is np.uint16 and best_token_dtype(65535) is np.int32
    assert best_token_dtype(128256) is np.int32 and best_token_dtype(None) is np.int32
    rng = np.random.default_rng(0)
    docs = [rng.integers(0, vocab, size=n) for n in (5, 1, 0, 17, 3)]
    docs[1] = [vocab - 1]  # python list input, max id
    ds = _write(tmp_path / "rt", docs, dtype)
    assert len(ds) == 5 and ds.dtype == np.dtype(dtype)
    for i, d in enumerate(docs):
        np.testing.assert_array_equal(ds[i], np.asarray(d))
        assert ds[i].dtype == np.dtype(dtype)
    np.testing.assert_array_equal(ds.sequence_lengths, [5, 1, 0, 17, 3])
    itemsize = np.dtype(dtype).itemsize
    np.testing.assert_array_equal(ds.sequence_pointers, np.array([0, 5, 6, 6, 23]) * itemsize)
    np.testing.assert_array_equal(ds.document_indices, [0, 1, 2, 3, 4, 5])
    np.testing.assert_array_equal(ds.get(3, offset=2, length=4), docs[3][2:6])
    np.testing.assert_array_equal(ds.get(3, offset=15), docs[3][15:])
    np.testing.assert_array_equal(ds[-1], docs[4])
    assert [len(x) for x in ds[1:4]] == [1, 0, 17]
    assert ds.num_tokens == 26
    with pytest.raises(IndexError):
        ds.get(0, offset=3, length=3)
    with pytest.raises(IndexError):
        ds[5]
    assert IndexedDataset.exists(str(tmp_path / "rt"))
    assert not IndexedDataset.exists(str(tmp_path / "nope"))
    # pickling reopens by path (what DataLoader workers get)
    clone = pickle.loads(pickle.dumps(ds))
    np.testing.assert_array_equal(clone[3], ds[3])
    assert _files(tmp_path) == ["rt.bin", "rt.idx"]  # no temporary files left


def test_exact_header_layout(tmp_path):
    docs = [[1, 2, 3], [4, 5], [6]]
    prefix = tmp_path / "hdr"
    builder = IndexedDatasetBuilder(str(prefix), np.uint16)
    builder.add_item(docs[0])
    builder.add_item(docs[1])  # first document: two sequences
    builder.end_document()
    builder.add_document(docs[2])
    builder.finalize()
    expected = (b"MMIDIDX\x00\x00" + struct.pack("<Q", 1) + struct.pack("<B", 8)
                + struct.pack("<Q", 3) + struct.pack("<Q", 3)
                + struct.pack("<3i", 3, 2, 1)
                + struct.pack("<3q", 0, 6, 10)
                + struct.pack("<3q", 0, 2, 3))
    assert (tmp_path / "hdr.idx").read_bytes() == expected
    assert (tmp_path / "hdr.bin").read_bytes() == struct.pack("<6H", 1, 2, 3, 4, 5, 6)
    ds = IndexedDataset(str(prefix))
    np.testing.assert_array_equal(ds.document_indices, [0, 2, 3])


def test_dtype_codes_and_limits(tmp_path):
    assert DTYPE_CODES == {1: np.uint8, 2: np.int8, 3: np.int16, 4: np.int32, 5: np.int64,
                           6: np.float64, 7: np.float32, 8: np.uint16}
    for code, dtype in DTYPE_CODES.items():
        _write(tmp_path / f"c{code}", [[1, 2]], dtype)
        assert (tmp_path / f"c{code}.idx").read_bytes()[17] == code
        assert IndexedDataset(str(tmp_path / f"c{code}")).dtype == np.dtype(dtype)
    with pytest.raises(ValueError, match="does not fit dtype uint16"):
        with IndexedDatasetBuilder(str(tmp_path / "big"), np.uint16) as b:
            b.add_document([70000])
    with pytest.raises(ValueError, match="unsupported token dtype"):
        IndexedDatasetBuilder(str(tmp_path / "x"), np.uint32)
    assert not IndexedDataset.exists(str(tmp_path / "big"))


def test_add_index_merges(tmp_path):
    a = _write(tmp_path / "a", [[1, 2], [3]], np.uint16)
    _write(tmp_path / "b", [[4, 5, 6]], np.uint16)
    with IndexedDatasetBuilder(str(tmp_path / "m"), np.uint16) as builder:
        builder.add_document([9])
        builder.add_index(str(tmp_path / "a"))
        builder.add_index(str(tmp_path / "b"))
        builder.add_document([7, 7])
    m = IndexedDataset(str(tmp_path / "m"))
    assert [m[i].tolist() for i in range(len(m))] == [[9], [1, 2], [3], [4, 5, 6], [7, 7]]
    np.testing.assert_array_equal(m.document_indices, [0, 1, 2, 3, 4, 5])
    np.testing.assert_array_equal(m.sequence_pointers, [0, 2, 6, 8, 14])
    del a
    _write(tmp_path / "w", [[1]], np.int32)
    with pytest.raises(ValueError, match="cannot merge"):
        with IndexedDatasetBuilder(str(tmp_path / "m2"), np.uint16) as builder:
            builder.add_index(str(tmp_path / "w"))


def test_failed_builder_leaves_nothing(tmp_path):
    with pytest.raises(RuntimeError, match="boom"):
        with IndexedDatasetBuilder(str(tmp_path / "fail"), np.uint16) as builder:
            builder.add_document([1, 2, 3])
            raise RuntimeError("boom")
    assert _files(tmp_path) == []
    # explicit abort, and a finalized-then-replaced dataset keeps the old pair until finalize
    _write(tmp_path / "keep", [[1, 2]], np.uint16)
    before = (tmp_path / "keep.idx").read_bytes(), (tmp_path / "keep.bin").read_bytes()
    builder = IndexedDatasetBuilder(str(tmp_path / "keep"), np.uint16)
    builder.add_document([5, 6, 7])
    assert ((tmp_path / "keep.idx").read_bytes(), (tmp_path / "keep.bin").read_bytes()) == before
    builder.abort()
    builder.abort()
    assert _files(tmp_path) == ["keep.bin", "keep.idx"]
    with pytest.raises(RuntimeError, match="already finalized or aborted"):
        builder.add_document([1])


# ----------------------------------------------------------------------------- validation
@pytest.fixture
def good(tmp_path):
    _write(tmp_path / "good", [[1, 2, 3], [4, 5]], np.uint16)
    return tmp_path / "good"


def _expect_error(prefix, pattern):
    with pytest.raises(ValueError, match=pattern) as info:
        IndexedDataset(str(prefix))
    assert "\n" not in str(info.value)
    return str(info.value)


def test_missing_files(tmp_path, good):
    msg = _expect_error(tmp_path / "absent", r"absent\.idx: file not found")
    assert "tools/preprocess_data.py" in msg
    os.remove(str(good) + ".bin")
    _expect_error(good, r"good\.bin: file not found")


def test_bad_magic(good):
    idx = str(good) + ".idx"
    data = bytearray(open(idx, "rb").read())
    data[0:4] = b"JUNK"
    open(idx, "wb").write(bytes(data))
    _expect_error(good, r"good\.idx: bad magic, not a Megatron indexed dataset")


def test_unsupported_version_and_dtype(good):
    idx = str(good) + ".idx"
    orig = open(idx, "rb").read()
    open(idx, "wb").write(orig[:9] + struct.pack("<Q", 2) + orig[17:])
    _expect_error(good, "unsupported index version 2")
    open(idx, "wb").write(orig[:17] + struct.pack("<B", 42) + orig[18:])
    _expect_error(good, "unknown dtype code 42")


def test_truncated_idx(good):
    idx = str(good) + ".idx"
    orig = open(idx, "rb").read()
    open(idx, "wb").write(orig[:-4])
    _expect_error(good, r"good\.idx: truncated index")
    open(idx, "wb").write(orig[:20])
    _expect_error(good, r"truncated index .* header needs")
    open(idx, "wb").write(b"MMID")
    _expect_error(good, "truncated index")
    open(idx, "wb").write(orig + b"\x00" * 5)
    _expect_error(good, "unexpected trailing bytes")


def test_bin_size_mismatch(tmp_path, good):
    bin_path = str(good) + ".bin"
    orig = open(bin_path, "rb").read()
    open(bin_path, "wb").write(orig[:-2])
    msg = _expect_error(good, r"good\.bin: truncated .*truncated or mismatched")
    assert "re-run tools/preprocess_data.py" in msg
    open(bin_path, "wb").write(orig + b"\x00\x00")
    _expect_error(good, "larger than its index")
    # a .bin from another dataset paired with this .idx
    _write(tmp_path / "other", [[1, 2, 3, 4, 5, 6, 7]], np.uint16)
    os.replace(str(tmp_path / "other.bin"), bin_path)
    _expect_error(good, "re-run tools/preprocess_data.py")


# ----------------------------------------------------------------------------- vs the specification
def _random_documents(rng, vocab, count, max_sequences=1):
    return [[rng.integers(0, vocab, size=int(rng.integers(0, 40))).tolist()
             for _ in range(int(rng.integers(1, max_sequences + 1)))] for _ in range(count)]


@pytest.mark.parametrize("dtype,code,vocab", [(np.uint16, 8, 65499), (np.int32, 4, 200_000)])
def test_bytes_equal_megatron_builder_and_spec_reader(tmp_path, dtype, code, vocab):
    """Our files are byte-identical to what Megatron-LM's builder writes (built here from the
    spec), and a reader written from the spec sees the same sequences as ours."""
    rng = np.random.default_rng(1)
    docs = _random_documents(rng, vocab, 60, max_sequences=3)
    docs[5] = [[]]  # an empty sequence
    docs[6] = [[vocab - 1, 0]]
    expected_idx, expected_bin = megatron_bytes(docs, code)
    prefix = tmp_path / "spec"
    with IndexedDatasetBuilder(str(prefix), dtype) as builder:
        for doc in docs:
            if len(doc) == 1:
                builder.add_document(doc[0])
            else:  # Megatron's add_document(tokens, lengths)
                builder.add_document(sum(doc, []), lengths=[len(s) for s in doc])
    assert (tmp_path / "spec.idx").read_bytes() == expected_idx
    assert (tmp_path / "spec.bin").read_bytes() == expected_bin
    index, sequences = read_dataset(str(prefix))
    assert index["version"] == 1 and index["code"] == code
    assert sequences == [seq for doc in docs for seq in doc]
    ours = IndexedDataset(str(prefix))
    assert [ours[i].tolist() for i in range(len(ours))] == sequences
    assert ours.sequence_lengths.tolist() == index["lengths"]
    assert ours.sequence_pointers.tolist() == index["pointers"]
    assert ours.document_indices.tolist() == index["documents"]


def test_spec_written_files_are_read_by_us(tmp_path):
    """The other direction: a pair written by the spec writer (as Megatron-LM would) reads back."""
    rng = np.random.default_rng(2)
    for code, dtype in ((8, np.uint16), (4, np.int32), (1, np.uint8), (5, np.int64)):
        docs = _random_documents(rng, 100, 25, max_sequences=2)
        idx, bin_ = megatron_bytes(docs, code)
        (tmp_path / f"m{code}.idx").write_bytes(idx)
        (tmp_path / f"m{code}.bin").write_bytes(bin_)
        ds = IndexedDataset(str(tmp_path / f"m{code}"))
        assert ds.dtype == np.dtype(dtype) and not ds.has_sequence_modes
        assert [ds[i].tolist() for i in range(len(ds))] == [s for d in docs for s in d]
        assert len(ds.document_indices) == len(docs) + 1


def test_bulk_and_streamed_writes_are_identical(tmp_path, monkeypatch):
    """add_documents, add_index and tiny flush/chunk sizes (side files assembled chunk by chunk)
    give the same bytes as the simple path."""
    rng = np.random.default_rng(3)
    docs = [d[0] for d in _random_documents(rng, 60000, 200)]
    expected_idx, expected_bin = megatron_bytes([[d] for d in docs], 8)
    monkeypatch.setattr(IndexedDatasetBuilder, "_FLUSH_EVERY", 3)
    monkeypatch.setattr(IndexedDatasetBuilder, "_CHUNK", 7)
    with IndexedDatasetBuilder(str(tmp_path / "one"), np.uint16) as b:
        for d in docs:
            b.add_document(d)
    with IndexedDatasetBuilder(str(tmp_path / "bulk"), np.uint16) as b:
        for k in range(0, 200, 30):
            part = docs[k:k + 30]
            b.add_documents(np.concatenate([np.asarray(d, np.uint16) for d in part]),
                            np.array([len(d) for d in part]))
        b.add_documents(np.zeros(0, np.uint16), np.zeros(0, np.int32))  # no-op
    with IndexedDatasetBuilder(str(tmp_path / "s1"), np.uint16) as b:
        for d in docs[:77]:
            b.add_document(d)
    with IndexedDatasetBuilder(str(tmp_path / "merged"), np.uint16) as b:
        b.add_index(str(tmp_path / "s1"))
        for d in docs[77:150]:
            b.add_document(d)
        with IndexedDatasetBuilder(str(tmp_path / "s2"), np.uint16) as b2:
            for d in docs[150:]:
                b2.add_document(d)
        b.add_index(str(tmp_path / "s2"))
        assert b.num_sequences == 200 and b.num_tokens == sum(map(len, docs))
    for name in ("one", "bulk", "merged"):
        assert (tmp_path / f"{name}.idx").read_bytes() == expected_idx, name
        assert (tmp_path / f"{name}.bin").read_bytes() == expected_bin, name
    assert not [f for f in _files(tmp_path) if f.startswith(".")]  # no side files left
    with pytest.raises(ValueError, match="lengths sum to 3, but 2 tokens"):
        with IndexedDatasetBuilder(str(tmp_path / "bad"), np.uint16) as b:
            b.add_documents(np.array([1, 2]), np.array([1, 2]))
    with pytest.raises(ValueError, match="do not split a document"):
        with IndexedDatasetBuilder(str(tmp_path / "bad"), np.uint16) as b:
            b.add_document([1, 2, 3], lengths=[1, 1])
    assert not IndexedDataset.exists(str(tmp_path / "bad"))
    assert not [f for f in _files(tmp_path) if f.startswith(".")]


def test_multimodal_index_is_read_but_not_merged(tmp_path):
    idx, bin_ = megatron_bytes([[[1, 2]], [[3]]], 8)
    (tmp_path / "mm.idx").write_bytes(idx + bytes([0, 1]))  # int8 sequence modes
    (tmp_path / "mm.bin").write_bytes(bin_)
    ds = IndexedDataset(str(tmp_path / "mm"))
    assert ds.has_sequence_modes and ds[1].tolist() == [3]
    with pytest.raises(ValueError, match="multimodal"):
        with IndexedDatasetBuilder(str(tmp_path / "out"), np.uint16) as b:
            b.add_index(str(tmp_path / "mm"))
    assert _files(tmp_path) == ["mm.bin", "mm.idx"]
