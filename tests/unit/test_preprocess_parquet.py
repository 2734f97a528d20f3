"""tools/preprocess_data.py on Parquet files / folders / globs and ``datasets`` Arrow folders.

The same rows written as JSON lines are the reference: the .bin/.idx bytes and the skip counts
must be identical, with any workers and partitions.
"""

import json
import os
import shutil

import pytest

pa = pytest.importorskip("pyarrow")
pq = pytest.importorskip("pyarrow.parquet")

from megatron_qsparse.data.tables import dataset_folder_files  # noqa: E402
from tests.helpers import load_tool  # noqa: E402
from tests.unit.test_preprocess_data import MODEL, run_tool  # noqa: E402

KJV = MODEL.replace("kjv_sp4k.model", "kjv_sample.jsonl")
N = 150


def _rows():
    """KJV chapters as rows, with the values the JSONL route skips at known places."""
    with open(KJV, encoding="utf-8") as f:
        texts = [json.loads(next(f))["text"] for _ in range(N)]
    texts[3] = None  # null: non-string value
    texts[40] = ""  # empty text
    texts[41] = "  \n "  # whitespace only: empty text
    texts[99] = "Ünïcödé ✓ \u2028 \x00 tab\tend"
    return {"text": texts, "id": list(range(N)), "title": [f"Chapter {i}" for i in range(N)]}


def _write_jsonl(path, rows, keys=("text", "id", "title")):
    with open(path, "w", encoding="utf-8") as f:
        for i in range(len(rows["text"])):
            f.write(json.dumps({k: rows[k][i] for k in keys}) + "\n")


def _table(rows, lo=0, hi=None):
    return pa.table({k: v[lo:hi] for k, v in rows.items()})


def _write_arrow_folder(path, rows, shards=3):
    """A ``Dataset.save_to_disk`` folder: with ``datasets`` if installed, else the same layout."""
    try:
        import datasets
    except ImportError:
        datasets = None
    if datasets is not None:
        datasets.disable_progress_bars()
        datasets.Dataset.from_dict(rows).save_to_disk(str(path), num_shards=shards)
        return
    os.makedirs(path)
    bounds = [len(rows["text"]) * k // shards for k in range(shards + 1)]
    names = [f"data-{k:05d}-of-{shards:05d}.arrow" for k in range(shards)]
    for k, name in enumerate(names):
        table = _table(rows, bounds[k], bounds[k + 1])
        with pa.OSFile(str(path / name), "wb") as sink, pa.ipc.new_stream(sink, table.schema) as w:
            for batch in table.to_batches(max_chunksize=20):
                w.write_batch(batch)
    (path / "state.json").write_text(json.dumps(
        {"_data_files": [{"filename": n} for n in names], "_split": None}))
    (path / "dataset_info.json").write_text("{}")


def _outputs(prefix, key="text"):
    return [open(f"{prefix}_{key}_document{e}", "rb").read() for e in (".bin", ".idx")]


def _args(inputs, out, *extra):
    return ["--input", *inputs, "--output-prefix", str(out), "--tokenizer-type",
            "SentencePieceTokenizer", "--tokenizer-model", MODEL, "--append-eod",
            "--log-interval", "0", *extra]


def _main(argv):
    return load_tool("preprocess_data").main(argv)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """The rows as JSON lines (the reference output and summary) and in every table layout."""
    tmp = tmp_path_factory.mktemp("tables")
    rows = _rows()
    _write_jsonl(tmp / "ref.jsonl", rows)
    pq.write_table(_table(rows), tmp / "one.parquet", row_group_size=17)  # 9 row groups
    shards = tmp / "shards"
    (shards / "b").mkdir(parents=True)
    pq.write_table(_table(rows, 0, 50), shards / "a.parquet", row_group_size=11)
    pq.write_table(_table(rows, 50, 90), shards / "b" / "part.parquet")
    pq.write_table(_table(rows, 90), shards / "c.parquet", row_group_size=25)
    (shards / "README.md").write_text("not data")
    _write_arrow_folder(tmp / "arrow", rows)
    table = _table(rows)  # the Arrow IPC *file* format (random access; Feather v2)
    with pa.OSFile(str(tmp / "file.arrow"), "wb") as sink, pa.ipc.new_file(sink, table.schema) as w:
        for batch in table.to_batches(max_chunksize=33):
            w.write_batch(batch)
    r = run_tool(*_args([str(tmp / "ref.jsonl")], tmp / "ref", "--workers", "2"))
    assert r.returncode == 0, r.stderr
    return tmp, _outputs(tmp / "ref"), r.stdout.strip().splitlines()[-1]


def _same_summary(a, b):
    """The summary up to the timing (documents, tokens, skips by reason)."""
    return a.split(" in ")[0] == b.split(" in ")[0]


@pytest.mark.parametrize("layout,extra", [
    ("one.parquet", []),
    ("one.parquet", ["--workers", "2", "--partitions", "2"]),
    ("shards", ["--workers", "3", "--partitions", "3"]),
    ("glob", ["--workers", "2"]),
    ("arrow", []),
    ("arrow", ["--workers", "2", "--partitions", "2"]),
    ("file.arrow", ["--workers", "3", "--partitions", "3"]),
])
def test_tables_give_the_jsonl_bytes(corpus, layout, extra):
    tmp, ref, ref_summary = corpus
    # the glob yields a.parquet, b/part.parquet, c.parquet: the rows' order
    inputs = [str(tmp / "shards" / "**" / "*.parquet")] if layout == "glob" else [str(tmp / layout)]
    out = tmp / f"out_{layout.replace('.', '_')}_{len(extra)}"
    r = run_tool(*_args(inputs, out, *extra, "--log-interval", "40"))
    assert r.returncode == 0, r.stderr
    assert _outputs(out) == ref, layout
    summary = r.stdout.strip().splitlines()[-1]
    assert _same_summary(summary, ref_summary), (summary, ref_summary)
    assert "skipped 3 (non-string value: 1, empty text: 2)" in summary
    assert "rows)" in r.stderr.splitlines()[0]  # the input line counts the rows
    progress = [x for x in r.stderr.splitlines() if x.startswith("processed ")]
    assert progress and "% of" in progress[-1] and "MB/s" in progress[-1]
    where = {"one.parquet": "one.parquet", "shards": "a.parquet", "glob": "a.parquet",
             "arrow": "data-00000-of-00003.arrow", "file.arrow": "file.arrow"}[layout]
    assert f"{where}: row 3: non-string value under 'text' (NoneType)" in r.stderr


def test_several_keys_and_a_one_split_dataset_dict(corpus, tmp_path):
    tmp, _, _ = corpus
    rows = _rows()
    _write_jsonl(tmp_path / "two.jsonl", rows, keys=("title", "text"))
    assert _main(_args([str(tmp_path / "two.jsonl")], tmp_path / "j", "--json-keys", "title",
                       "text")) == 0
    dd = tmp_path / "dd"
    dd.mkdir()
    shutil.copytree(tmp / "arrow", dd / "train")
    (dd / "dataset_dict.json").write_text(json.dumps({"splits": ["train"]}))
    assert _main(_args([str(dd)], tmp_path / "a", "--json-keys", "title", "text")) == 0
    for key in ("title", "text"):
        assert _outputs(tmp_path / "a", key) == _outputs(tmp_path / "j", key), key
    # a DatasetDict with several splits: say which, and how to pick one
    shutil.copytree(tmp / "arrow", dd / "test")
    (dd / "dataset_dict.json").write_text(json.dumps({"splits": ["train", "test"]}))
    with pytest.raises(ValueError, match=r"DatasetDict with splits train, test; pass the folder "
                                         r"of the split to read, e.g. --input .*dd/train"):
        dataset_folder_files(str(dd))
    assert _main(_args([str(dd / "test")], tmp_path / "t", "--json-keys", "title", "text")) == 0


def test_values_the_jsonl_route_skips_are_skipped_alike(tmp_path, capsys):
    """Non-string columns and invalid UTF-8 in a string column: counted as in JSON lines."""
    ints = {"text": list(range(5)) + [None]}
    _write_jsonl(tmp_path / "ints.jsonl", ints, keys=("text",))
    pq.write_table(pa.table(ints), tmp_path / "ints.parquet")
    for name in ("ints.jsonl", "ints.parquet"):
        assert _main(_args([str(tmp_path / name)], tmp_path / "o", "--allow-empty")) == 0
        assert "skipped 6 (non-string value: 6)" in capsys.readouterr().out
    bad = pa.array([b"fine text", b"caf\xe9", None, b"more fine text"]).view(pa.string())
    pq.write_table(pa.table({"text": bad}), tmp_path / "utf8.parquet")
    assert _main(_args([str(tmp_path / "utf8.parquet")], tmp_path / "u")) == 0
    out, err = capsys.readouterr()
    assert "done: 2 documents" in out and "invalid UTF-8: 1, non-string value: 1" in out
    assert "utf8.parquet: row 1: invalid UTF-8 under 'text' (byte 0xe9 at offset 3)" in err


def _one_line_error(capsys, *needles):
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: "), err
    for needle in needles:
        assert needle in err[-1], (needle, err[-1])
    return err[-1]


def test_table_errors_are_one_line(corpus, tmp_path, capsys):
    tmp, _, _ = corpus
    out = tmp_path / "out"
    assert _main(_args([str(tmp / "one.parquet")], out / "x", "--json-keys", "content")) == 2
    _one_line_error(capsys, "one.parquet: no column 'content' (columns: text, id, title)",
                    "--json-keys")
    assert _main(_args([str(tmp / "arrow")], out / "x", "--json-keys", "body")) == 2
    _one_line_error(capsys, "no column 'body' (columns: text, id, title)")
    broken = tmp_path / "broken.parquet"
    broken.write_bytes(open(tmp / "one.parquet", "rb").read()[:-100])  # truncated: no footer
    assert _main(_args([str(broken)], out / "x")) == 2
    _one_line_error(capsys, f"{broken}: not a readable Parquet file", "re-download")
    garbage = tmp_path / "garbage.arrow"
    garbage.write_bytes(b"\xff\xff\xff\xff" + os.urandom(64))
    assert _main(_args([str(garbage)], out / "x")) == 2
    _one_line_error(capsys, f"{garbage}: not a readable Arrow IPC file")
    (tmp_path / "empty").mkdir()
    assert _main(_args([str(tmp_path / "empty")], out / "x")) == 2
    _one_line_error(capsys, "directory holds no .jsonl", ".parquet", "save_to_disk")
    assert not out.exists() or os.listdir(out) == []  # nothing written


def test_an_undecodable_row_group_is_skipped_and_counted(tmp_path, capsys):
    rows = {"text": [f"Document number {i} of the corpus." for i in range(30)]}
    src = tmp_path / "c.parquet"
    pq.write_table(pa.table(rows), src, row_group_size=10, compression="none")
    page = pq.ParquetFile(src).metadata.row_group(1).column(0).data_page_offset
    data = bytearray(src.read_bytes())
    data[page:page + 16] = b"\xde\xad" * 8  # the page header of row group 1
    src.write_bytes(bytes(data))
    assert _main(_args([str(src)], tmp_path / "o", "--workers", "2")) == 0
    out, err = capsys.readouterr()
    assert "done: 20 documents" in out and "unreadable Parquet row group / Arrow batch: 1" in out
    assert f"warning: {src}: row group 1 (rows 10-19) is unreadable" in err
    assert _main(_args([str(src)], tmp_path / "s", "--strict")) == 2
    _one_line_error(capsys, f"{src}: row group 1 (rows 10-19) is unreadable")
    assert not (tmp_path / "s_text_document.bin").exists()


def test_inputs_and_partition_plans(corpus, tmp_path):
    from megatron_qsparse.data.corpus import Piece, expand_inputs, plan_partitions
    from megatron_qsparse.data.tables import TablePiece, table_info, table_kind

    tmp, _, _ = corpus
    root = tmp_path / "mixed"
    (root / "sub").mkdir(parents=True)
    shutil.copytree(tmp / "arrow", root / "m_arrow")  # a save_to_disk folder met while searching
    shutil.copy(tmp / "one.parquet", root / "sub" / "z.parquet")
    shutil.copy(tmp / "ref.jsonl", root / "a.jsonl")
    found = expand_inputs([str(root)], tables=True)
    shards = [str(root / "m_arrow" / f"data-0000{k}-of-00003.arrow") for k in range(3)]
    assert found == [str(root / "a.jsonl"), *shards, str(root / "sub" / "z.parquet")]
    assert expand_inputs([str(root)]) == [str(root / "a.jsonl")]  # JSON lines only by default
    assert expand_inputs([str(root / "m_arrow")], tables=True) == shards
    assert [table_kind(f) for f in found] == [None, "arrow-stream", "arrow-stream",
                                              "arrow-stream", "parquet"]
    tables = {f: table_info(f, table_kind(f), ["text"]) for f in found[1:]}
    assert tables[found[-1]].rows == N and len(tables[found[-1]].groups) == 9
    assert sum(b for _, b in tables[found[-1]].groups) == os.path.getsize(found[-1])
    for parts in (1, 2, 3, 7):
        plan = plan_partitions(found, parts, tables)
        assert 1 <= len(plan) <= parts
        visited = []  # every group of every table exactly once, in order
        for part in plan:
            for piece in part:
                if isinstance(piece, TablePiece):
                    stop = len(piece.info.groups) if piece.end is None else piece.end
                    visited += [(piece.path, g) for g in range(piece.start, stop)]
                else:
                    assert isinstance(piece, Piece)
        assert visited == [(f, g) for f in found[1:] for g in range(len(tables[f].groups))]
