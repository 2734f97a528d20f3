"""tools/merge_datasets.py: directory and prefix inputs, equality with one run, errors, atomicity."""

import os
import re
import subprocess
import sys

import numpy as np
import pytest

from megatron_qsparse.data.indexed_dataset import IndexedDataset, IndexedDatasetBuilder
from tests.helpers import clean_env, load_tool
from tests.unit.megatron_format import megatron_bytes

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TOOL = os.path.join(REPO, "tools", "merge_datasets.py")


def _main(argv):
    return load_tool("merge_datasets").main(argv)


def _write(prefix, docs, dtype=np.uint16):
    with IndexedDatasetBuilder(str(prefix), dtype) as b:
        for d in docs:
            b.add_document(d)


def _docs(seed, n):
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 4000, size=int(rng.integers(1, 30))).tolist() for _ in range(n)]


def test_merge_directory_in_sorted_order(tmp_path, capsys):
    shards = tmp_path / "shards"
    shards.mkdir()
    parts = {"s_00": _docs(0, 5), "s_01": _docs(1, 7), "s_02": _docs(2, 1)}
    for name in ("s_02", "s_00", "s_01"):  # creation order does not matter
        _write(shards / name, parts[name])
    (shards / "notes.txt").write_text("ignored")
    (shards / "s_00_train_abc_doc_idx.npy").write_bytes(b"ignored cache file")
    out = tmp_path / "merged" / "all"
    assert _main(["--input", str(shards), "--output-prefix", str(out)]) == 0
    summary = capsys.readouterr().out.strip().splitlines()[-1]
    assert summary.startswith("done: merged 3 shards: 13 sequences, 13 documents")
    all_docs = parts["s_00"] + parts["s_01"] + parts["s_02"]
    idx, bin_ = megatron_bytes([[d] for d in all_docs], 8)
    assert (tmp_path / "merged" / "all.idx").read_bytes() == idx
    assert (tmp_path / "merged" / "all.bin").read_bytes() == bin_
    assert sorted(os.listdir(tmp_path / "merged")) == ["all.bin", "all.idx"]


def test_merge_explicit_prefixes_in_given_order(tmp_path):
    _write(tmp_path / "b", [[1, 2]])
    _write(tmp_path / "a", [[3], [4, 5]])
    r = subprocess.run([sys.executable, TOOL, "--input", str(tmp_path / "b.bin"),
                        str(tmp_path / "a"), "--output-prefix", str(tmp_path / "m")],
                       capture_output=True, text=True, timeout=60, env=clean_env())
    assert r.returncode == 0, r.stderr
    m = IndexedDataset(str(tmp_path / "m"))
    assert [m[i].tolist() for i in range(len(m))] == [[1, 2], [3], [4, 5]]


@pytest.mark.parametrize("case", ["dtype", "missing_idx", "truncated", "self", "empty"])
def test_merge_errors(tmp_path, capsys, case):
    shards = tmp_path / "shards"
    shards.mkdir()
    _write(shards / "a", [[1, 2, 3]])
    _write(shards / "b", [[4]])
    out = str(tmp_path / "out")
    if case == "dtype":
        _write(shards / "c", [[5]], np.int32)
        pattern = r"different token dtypes: .*a is uint16 but .*c is int32"
    elif case == "missing_idx":
        os.remove(shards / "b.idx")
        pattern = r"b\.bin has no matching b\.idx"
    elif case == "truncated":
        data = (shards / "b.bin").read_bytes()
        (shards / "b.bin").write_bytes(data[:-1])
        pattern = r"b\.bin: truncated"
    elif case == "self":
        out = str(shards / "a")
        pattern = "is also an input shard"
    else:
        for f in os.listdir(shards):
            os.remove(shards / f)
        pattern = "no .bin/.idx shard pairs"
    before = sorted(os.listdir(shards))
    assert _main(["--input", str(shards), "--output-prefix", out]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and len(err.splitlines()) == 1
    assert re.search(pattern, err), err
    assert sorted(os.listdir(shards)) == before  # inputs untouched
    assert sorted(os.listdir(tmp_path)) == ["shards"]  # nothing written, no temporary files
