"""tools/preprocess_data.py end to end: bad lines, workers, read-back, .jsonl.gz, errors."""

import gzip
import json
import os
import subprocess
import sys

import numpy as np

from megatron_qsparse.data.indexed_dataset import IndexedDataset
from megatron_qsparse.data.tokenizer import build_tokenizer

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TOOL = os.path.join(REPO, "tools", "preprocess_data.py")
MODEL = os.path.join(REPO, "examples", "data", "kjv_sp4k.model")


def corpus_lines():
    good = [f"Verse {i}: And the LORD spake unto Moses, saying {i * 7}. Ünïcödé ✓" for i in range(30)]
    lines = [json.dumps({"text": t, "id": i}) for i, t in enumerate(good)]
    bad = {
        3: "{not json",
        8: json.dumps({"title": "no text key"}),
        12: json.dumps({"text": 42}),
        17: json.dumps({"text": "   "}),
        20: json.dumps(["a", "list"]),
        25: "",
    }
    for pos in sorted(bad, reverse=True):
        lines.insert(pos, bad[pos])
    return good, lines


def run_tool(*args):
    return subprocess.run([sys.executable, TOOL, *args], capture_output=True, text=True,
                          cwd=REPO, timeout=120)


def check_read_back(prefix, good, tokenizer):
    ds = IndexedDataset(prefix)
    assert len(ds) == len(good) and ds.dtype == np.uint16
    for i, text in enumerate(good):
        assert ds[i].tolist() == tokenizer.tokenize(text) + [tokenizer.eod]


def test_preprocess_with_bad_lines_and_workers(tmp_path):
    good, lines = corpus_lines()
    src = tmp_path / "corpus.jsonl"
    src.write_text("\n".join(lines) + "\n", encoding="utf-8")
    out = tmp_path / "out" / "corpus"
    r = run_tool("--input", str(src), "--output-prefix", str(out), "--tokenizer-type",
                 "SentencePieceTokenizer", "--tokenizer-model", MODEL, "--append-eod",
                 "--workers", "2", "--log-interval", "10")
    assert r.returncode == 0, r.stderr
    summary = r.stdout.strip().splitlines()[-1]
    tok = build_tokenizer("SentencePieceTokenizer", MODEL)
    n_tokens = sum(len(tok.tokenize(t)) + 1 for t in good)
    assert summary.startswith(f"done: {len(good)} documents, {n_tokens} tokens, skipped 6 (")
    for reason in ("blank line: 1", "invalid JSON: 1", "not a JSON object: 1", "missing key: 1",
                   "non-string value: 1", "empty text: 1"):
        assert reason in summary
    assert "docs/s" in r.stderr and "MB/s" in r.stderr  # progress lines
    check_read_back(str(out) + "_text_document", good, tok)
    assert sorted(os.listdir(tmp_path / "out")) == ["corpus_text_document.bin",
                                                    "corpus_text_document.idx"]


def test_preprocess_gzip_in_process(tmp_path, capsys):
    sys.path.insert(0, REPO)
    try:
        from tools.preprocess_data import main
    finally:
        sys.path.remove(REPO)
    good, lines = corpus_lines()
    src = tmp_path / "corpus.jsonl.gz"
    with gzip.open(src, "wt", encoding="utf-8") as f:
        f.write("\n".join(lines) + "\n")
    out = tmp_path / "gz"
    assert main(["--input", str(src), "--output-prefix", str(out), "--tokenizer-type",
                 "ByteTokenizer", "--append-eod", "--log-interval", "0"]) == 0
    assert f"done: {len(good)} documents" in capsys.readouterr().out
    check_read_back(str(out) + "_text_document", good, build_tokenizer("ByteTokenizer", None))


def test_preprocess_errors(tmp_path):
    r = run_tool("--input", str(tmp_path / "missing.jsonl"), "--output-prefix", str(tmp_path / "x"),
                 "--tokenizer-model", MODEL)
    assert r.returncode == 2
    assert r.stderr.strip().startswith("error: --input") and len(r.stderr.strip().splitlines()) == 1
    src = tmp_path / "c.jsonl"
    src.write_text(json.dumps({"text": "hi"}) + "\n")
    r = run_tool("--input", str(src), "--output-prefix", str(tmp_path / "x"))
    assert r.returncode == 2 and "--tokenizer-model" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and r.stderr.startswith("error: ")
    r = run_tool("--input", str(src), "--output-prefix", str(tmp_path / "x"),
                 "--tokenizer-model", str(tmp_path / "nope.model"))
    assert r.returncode == 2 and r.stderr.startswith("error: ") and "not found" in r.stderr
    assert sorted(os.listdir(tmp_path)) == ["c.jsonl"]  # nothing written on errors
    r = run_tool("--help")
    assert r.returncode == 0
    for flag in ("--input", "--output-prefix", "--json-keys", "--tokenizer-type",
                 "--tokenizer-model", "--append-eod", "--workers", "--log-interval"):
        assert flag in r.stdout
