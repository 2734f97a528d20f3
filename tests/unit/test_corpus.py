"""Corpus reading: input discovery, compression by content, partition plans, line-aligned blobs."""

import gzip

import numpy as np
import pytest

from megatron_qsparse.data import corpus
from megatron_qsparse.data.corpus import (
    BlobReader,
    CorruptInputError,
    Piece,
    check_decoders,
    compression_of,
    expand_inputs,
    iter_lines,
    plan_partitions,
    split_lines,
)


def _lines(n, seed=0, long_every=0):
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        size = int(rng.integers(0, 40))
        if long_every and i % long_every == 0:
            size = 300
        out.append(f"{i}:" + "x" * size)
    return out


def _read_all(pieces, blob_bytes):
    got = []
    for piece in pieces:
        for first, blob in BlobReader(piece, blob_bytes):
            for k, line in enumerate(split_lines(blob)):
                got.append((piece.path, first + k, line.decode()))
    return got


def test_expand_inputs(tmp_path):
    (tmp_path / "d" / "sub").mkdir(parents=True)
    (tmp_path / "d" / ".hidden").mkdir()
    for name in ("d/b.jsonl", "d/a.jsonl.gz", "d/sub/c.json.zst", "d/sub/notes.txt",
                 "d/.x.jsonl", "d/.hidden/y.jsonl", "d/C.NDJSON", "one.jsonl", "two.jsonl"):
        (tmp_path / name).write_bytes(b"")
    d = str(tmp_path / "d")
    assert expand_inputs([d]) == [f"{d}/C.NDJSON", f"{d}/a.jsonl.gz", f"{d}/b.jsonl",
                                  f"{d}/sub/c.json.zst"]
    one, two = str(tmp_path / "one.jsonl"), str(tmp_path / "two.jsonl")
    # specs keep their order, a pattern is sorted, a file named twice is read once
    assert expand_inputs([two, str(tmp_path / "*.jsonl"), one]) == [two, one]
    assert expand_inputs([str(tmp_path / "d" / "**" / "*.zst")]) == [f"{d}/sub/c.json.zst"]
    with pytest.raises(ValueError, match=r"--input '.*nope\.jsonl': no such file or directory"):
        expand_inputs([str(tmp_path / "nope.jsonl")])
    with pytest.raises(ValueError, match="the pattern matches no files"):
        expand_inputs([str(tmp_path / "*.parquet")])
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="directory holds no .jsonl"):
        expand_inputs([str(tmp_path / "empty")])


def test_compression_is_detected_by_content(tmp_path):
    plain, gz = tmp_path / "a.jsonl", tmp_path / "looks_plain.jsonl"
    plain.write_bytes(b"hello\nworld\n")
    gz.write_bytes(gzip.compress(b"hello\nworld\n"))
    assert compression_of(str(plain)) is None and compression_of(str(gz)) == "gzip"
    assert [x[2] for x in iter_lines([str(plain), str(gz)])] == [b"hello", b"world"] * 2


@pytest.mark.parametrize("blob_bytes", [1, 7, 64, 1 << 20])
def test_partition_plans_cover_every_line_once(tmp_path, blob_bytes):
    texts = [_lines(57, 1, long_every=13), _lines(3, 2), [], _lines(40, 3)]
    paths = []
    for k, lines in enumerate(texts):
        p = tmp_path / f"f{k}.jsonl"
        data = "".join(line + "\n" for line in lines)
        if k == 3:
            data = data[:-1]  # last line without its newline
        if k == 1:
            p = tmp_path / f"f{k}.jsonl.gz"
            p.write_bytes(gzip.compress(data.encode()))
        else:
            p.write_text(data)
        paths.append(str(p))
    expected = [(paths[k], i + 1, line) for k, lines in enumerate(texts)
                for i, line in enumerate(lines)]
    for n in (1, 2, 3, 5, 8, 40):
        plan = plan_partitions(paths, n)
        assert 1 <= len(plan) <= n
        flat = [piece for part in plan for piece in part]
        gz_pieces = [p for p in flat if p.path == paths[1]]
        assert gz_pieces == [Piece(paths[1])]  # compressed files are never cut
        assert _read_all(flat, blob_bytes) == expected


def test_blob_reader_progress_and_blank_lines(tmp_path):
    p = tmp_path / "b.jsonl"
    p.write_bytes(b"a\n\n\nbb\n")
    reader = BlobReader(Piece(str(p)), 2)
    got = [(first, split_lines(blob)) for first, blob in reader]
    assert [line for _, lines in got for line in lines] == [b"a", b"", b"", b"bb"]
    assert got[0][0] == 1 and reader.raw_done == reader.raw_total == 7
    assert reader.lines_read == 4


def test_truncated_gzip_is_reported_with_the_last_good_line(tmp_path):
    data = "".join(f'{{"text": "line {i} {"y" * (i % 50)}"}}\n' for i in range(20000)).encode()
    packed = gzip.compress(data)
    p = tmp_path / "t.jsonl.gz"
    p.write_bytes(packed[:len(packed) // 2])
    got = []
    with pytest.raises(CorruptInputError) as info:
        for first, blob in BlobReader(Piece(str(p)), 4096):
            got.extend(split_lines(blob))
    assert 0 < len(got) < 20000 and info.value.line == len(got)
    assert got == data.split(b"\n")[:len(got)]  # everything yielded is good
    msg = str(info.value)
    assert msg.startswith(f"{p}: truncated or corrupt compressed stream") and "after line" in msg


def test_zstd(tmp_path, monkeypatch):
    zstandard = pytest.importorskip("zstandard")
    data = b"".join(b'{"text": "%d"}\n' % i for i in range(5000))
    p = tmp_path / "z.jsonl.zst"
    # two frames back to back (what pzstd / zstdmt write)
    cctx = zstandard.ZstdCompressor()
    first = cctx.compress(data[:30000])
    p.write_bytes(first + cctx.compress(data[30000:]))
    assert compression_of(str(p)) == "zstd"
    assert [x[2] for x in iter_lines([str(p)])] == data.split(b"\n")[:-1]
    packed = p.read_bytes()
    bad = tmp_path / "bad.jsonl.zst"
    bad.write_bytes(packed[:len(packed) // 3])
    with pytest.raises(CorruptInputError, match="truncated or corrupt"):
        list(iter_lines([str(bad)]))
    junk = tmp_path / "junk.jsonl.zst"
    junk.write_bytes(first + b"\x00" * 4 + packed[len(first) + 4:])  # bad second frame
    with pytest.raises(CorruptInputError, match="ZstdError"):
        list(iter_lines([str(junk)]))
    monkeypatch.setattr(corpus, "_zstandard", lambda: None)
    with pytest.raises(ValueError, match=r"needs the zstandard package; pip install zstandard=="):
        check_decoders([str(p)])


def test_huge_line_is_read_whole(tmp_path):
    p = tmp_path / "h.jsonl"
    big = b"z" * 100_000
    p.write_bytes(b"a\n" + big + b"\nb\n")
    assert [x[2] for x in iter_lines([str(p)])] == [b"a", big, b"b"]
    halves = plan_partitions([str(p)], 2)
    assert _read_all([q for part in halves for q in part], 1000) == [
        (str(p), 1, "a"), (str(p), 2, big.decode()), (str(p), 3, "b")]
