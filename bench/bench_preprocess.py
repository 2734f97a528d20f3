#!/usr/bin/env python
"""Data pipeline throughput: preprocessing tokens/s (workers; JSONL, Parquet, Arrow), GPT index build.

1. Generates a JSON-lines corpus of ``--size-mb`` MB (default 200) in a temporary directory:
   English text made of random passages of the bundled KJV corpus (``examples/data``), documents
   of log-normal length (median ~400 words, ~2.2 KB; mean ~2.8 KB, like web text). Then runs ``tools/preprocess_data.py``
   (the real CLI, a fresh process each time) with the committed ``kjv_sp4k.model`` and
   ``--append-eod`` at 1 worker, 2 workers, and 2 workers in 2 partitions; prints docs/s, MB/s
   (input bytes), tokens/s and the ratio to 1 worker, and checks the outputs are identical.
   The same documents are also written as Parquet (snappy, row groups of 4096 rows) and as a
   ``datasets`` ``save_to_disk`` folder (Arrow stream, batches of 1000 rows, written with
   pyarrow) and run alike, each run's three formats back to back; a second table gives MB/s of
   *text* (the UTF-8 bytes of the documents, the same for every format), the ratio to the JSONL
   run of the same flags, whether the outputs equal the JSONL ones, and the rate of reading each
   format alone, without tokenizing (``--skip-tables``: JSONL only).
2. Writes a synthetic indexed dataset of ``--tokens`` tokens (default 1e9) as only its ``.idx``
   (random document lengths, mean ``--doc-tokens``) plus a sparse ``.bin`` of the right size,
   and times building the GPT document/sample/shuffle indices for ``--seq-length`` samples
   covering it once: cold (empty cache), cached (second run), and a 0.3/0.7 blend of two such
   datasets; with the peak Python/numpy memory of each step (tracemalloc).

Usage: ``python bench/bench_preprocess.py [--quick] [--size-mb 200] [--tokens 1e9] [--skip-tables]``
(``--quick``: 20 MB and 1e8 tokens). Timings are wall-clock on a shared machine; compare rows of
one run.
"""

from __future__ import annotations

import argparse
import filecmp
import itertools
import json
import os
import shutil
import struct
import subprocess
import sys
import tempfile
import time
import tracemalloc

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

import numpy as np  # noqa: E402

from megatron_qsparse.data.gpt_dataset import GPTDataset, build_train_valid_test_datasets  # noqa: E402
from megatron_qsparse.data.indexed_dataset import IndexedDataset  # noqa: E402

KJV = os.path.join(REPO, "examples", "data", "kjv_sample.jsonl")
MODEL = os.path.join(REPO, "examples", "data", "kjv_sp4k.model")
TOOL = os.path.join(REPO, "tools", "preprocess_data.py")


def generate_corpus(path: str, size_bytes: int, seed: int = 0) -> tuple[int, int]:
    """Write random KJV passages as jsonl until ``size_bytes``; returns (documents, bytes)."""
    with open(KJV, encoding="utf-8") as f:
        words = " ".join(json.loads(line)["text"] for line in f).split()
    rng = np.random.default_rng(seed)
    docs = written = 0
    with open(path, "w", encoding="utf-8") as out:
        while written < size_bytes:
            lengths = np.clip(rng.lognormal(mean=6.0, sigma=0.8, size=4096), 20, 20000).astype(int)
            starts = rng.integers(0, len(words) - 20001, size=4096)
            for start, n in zip(starts, lengths):
                line = json.dumps({"text": " ".join(words[start:start + n]),
                                   "id": f"doc-{docs}"}) + "\n"
                out.write(line)
                written += len(line.encode("utf-8"))
                docs += 1
                if written >= size_bytes:
                    break
    return docs, written


def write_tables(corpus: str, parquet: str, arrow_dir: str) -> int:
    """The documents of ``corpus`` as one Parquet file and one save_to_disk folder (Arrow
    stream shards, as ``datasets`` writes them); returns the UTF-8 bytes of their text."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    schema = pa.schema([("text", pa.string()), ("id", pa.string())])
    os.makedirs(arrow_dir)
    shard = "data-00000-of-00001.arrow"
    text_bytes = 0
    with open(corpus, encoding="utf-8") as f, \
            pq.ParquetWriter(parquet, schema, compression="snappy") as pw, \
            pa.OSFile(os.path.join(arrow_dir, shard), "wb") as sink, \
            pa.ipc.new_stream(sink, schema) as aw:
        while True:
            docs = [json.loads(line) for line in itertools.islice(f, 4096)]
            if not docs:
                break
            table = pa.Table.from_pylist(docs, schema=schema)
            text_bytes += sum(len(d["text"].encode("utf-8")) for d in docs)
            pw.write_table(table, row_group_size=4096)
            for batch in table.to_batches(max_chunksize=1000):
                aw.write_batch(batch)
    with open(os.path.join(arrow_dir, "state.json"), "w") as f:
        json.dump({"_data_files": [{"filename": shard}], "_split": None}, f)
    with open(os.path.join(arrow_dir, "dataset_info.json"), "w") as f:
        json.dump({}, f)
    return text_bytes


def disk_bytes(path: str) -> int:
    if os.path.isfile(path):
        return os.path.getsize(path)
    return sum(os.path.getsize(os.path.join(path, n)) for n in os.listdir(path))


def run_preprocess(corpus: str, prefix: str, workers: int, partitions: int) -> tuple[float, str]:
    cmd = [sys.executable, TOOL, "--input", corpus, "--output-prefix", prefix,
           "--tokenizer-type", "SentencePieceTokenizer", "--tokenizer-model", MODEL,
           "--append-eod", "--workers", str(workers), "--partitions", str(partitions),
           "--log-interval", "0"]
    start = time.perf_counter()
    r = subprocess.run(cmd, capture_output=True, text=True)
    wall = time.perf_counter() - start
    if r.returncode != 0:
        raise SystemExit(f"preprocess_data.py failed:\n{r.stderr}")
    return wall, r.stdout.strip().splitlines()[-1]


RUNS = ((1, 1), (2, 1), (2, 2))  # (workers, partitions)


def run_name(workers: int, partitions: int) -> str:
    return f"--workers {workers}" + (f" --partitions {partitions}" if partitions > 1 else "")


def same_output(a: str, b: str) -> bool:
    return all(filecmp.cmp(a + ext, b + ext, shallow=False) for ext in (".bin", ".idx"))


def bench_preprocess(tmp: str, size_mb: float, tables: bool = True) -> None:
    corpus = os.path.join(tmp, "corpus.jsonl")
    t = time.perf_counter()
    docs, nbytes = generate_corpus(corpus, int(size_mb * 1e6))
    print(f"## preprocessing: {nbytes / 1e6:.1f} MB jsonl, {docs:,} documents "
          f"(mean {nbytes / docs / 1e3:.1f} KB), generated in {time.perf_counter() - t:.1f} s; "
          f"SentencePieceTokenizer kjv_sp4k.model (vocab 4096), --append-eod; "
          f"{os.cpu_count()} CPUs")
    inputs = {"JSONL": corpus}
    if tables:
        parquet, arrow = os.path.join(tmp, "corpus.parquet"), os.path.join(tmp, "corpus_arrow")
        t = time.perf_counter()
        text = write_tables(corpus, parquet, arrow)
        inputs.update(Parquet=parquet, Arrow=arrow)
        written = time.perf_counter() - t
    # each run's formats back to back, so a drift in the machine's load touches them alike
    walls, outs, tokens = {}, {}, 0
    for run in RUNS:
        for fmt, src in inputs.items():
            prefix = os.path.join(tmp, f"{fmt.lower()}_w{run[0]}_p{run[1]}")
            walls[fmt, run], summary = run_preprocess(src, prefix, *run)
            outs[fmt, run] = prefix + "_text_document"
            tokens = int(summary.split(" documents, ")[1].split(" tokens")[0])
    widths = (26, 7, 8, 6, 10, 11)
    print(row(("run", "wall s", "docs/s", "MB/s", "tokens/s", "vs 1 worker"), widths))
    print(rule(widths))
    base = walls["JSONL", RUNS[0]]
    for run in RUNS:
        wall = walls["JSONL", run]
        print(row((run_name(*run), f"{wall:.1f}", f"{docs / wall:,.0f}",
                   f"{nbytes / wall / 1e6:.2f}", f"{tokens / wall:,.0f}", f"{base / wall:.2f}x"),
                  widths))
    same = all(same_output(outs["JSONL", RUNS[0]], outs["JSONL", run]) for run in RUNS[1:])
    print(f"outputs byte-identical across runs: {'yes' if same else 'NO'}; {tokens:,} tokens "
          f"({tokens / docs:,.0f} per document)")
    if not tables:
        return
    sizes = ", ".join(f"{fmt} {disk_bytes(src) / 1e6:.1f} MB" for fmt, src in inputs.items())
    print(f"\n## input formats: the same documents, {text / 1e6:.1f} MB of text; on disk {sizes} "
          f"(Parquet snappy, 4096-row groups; Arrow = a datasets save_to_disk folder, 1000-row "
          f"batches; written in {written:.1f} s); text MB/s = UTF-8 bytes of the documents / "
          f"wall time; vs JSONL = the JSONL run of the same flags")
    widths = (36, 7, 11, 8, 10)
    print(row(("input, run", "wall s", "text MB/s", "vs JSONL", "same bytes"), widths))
    print(rule(widths))
    for fmt in inputs:
        for run in RUNS:
            wall, ref = walls[fmt, run], walls["JSONL", run]
            same = "-" if fmt == "JSONL" else (
                "yes" if same_output(outs["JSONL", run], outs[fmt, run]) else "NO")
            print(row((f"{fmt} {run_name(*run)}", f"{wall:.1f}", f"{text / wall / 1e6:.2f}",
                       f"{ref / wall:.2f}x", same), widths))
    rates = ", ".join(f"{fmt} {text / read_seconds(src) / 1e6:,.0f}" for fmt, src in inputs.items())
    print(f"reading alone (this process, no tokenizer), text MB/s: {rates}")


def read_seconds(src: str) -> float:
    """Seconds to stream ``src`` as preprocess_data.py does (blobs or row blocks), untokenized."""
    from megatron_qsparse.data.corpus import BlobReader, expand_inputs, plan_partitions
    from megatron_qsparse.data.tables import TablePiece, TableReader, table_info, table_kind

    files = expand_inputs([src], tables=True)
    tables = {f: table_info(f, k, ["text"]) for f in files if (k := table_kind(f))}
    start = time.perf_counter()
    for piece in plan_partitions(files, 1, tables)[0]:
        table = isinstance(piece, TablePiece)
        for _ in TableReader(piece, ["text"]) if table else BlobReader(piece):
            pass
    return time.perf_counter() - start


def write_synthetic(prefix: str, num_tokens: int, doc_tokens: int, seed: int) -> int:
    """A uint16 indexed dataset of ~num_tokens tokens: real .idx, sparse .bin; returns #docs."""
    rng = np.random.default_rng(seed)
    n = max(1, num_tokens // doc_tokens)
    lengths = rng.integers(1, 2 * doc_tokens, size=n).astype(np.int64)
    lengths = np.maximum(1, (lengths * (num_tokens / lengths.sum())).astype(np.int64))
    lengths[-1] += num_tokens - lengths.sum()
    pointers = np.zeros(n, np.int64)
    np.cumsum(lengths[:-1] * 2, out=pointers[1:])
    with open(prefix + ".idx", "wb") as f:
        f.write(b"MMIDIDX\x00\x00" + struct.pack("<QBQQ", 1, 8, n, n + 1))
        f.write(lengths.astype("<i4").tobytes())
        f.write(pointers.astype("<i8").tobytes())
        f.write(np.arange(n + 1, dtype="<i8").tobytes())
    with open(prefix + ".bin", "wb") as f:
        f.truncate(int(lengths.sum()) * 2)
    return n


def measure(make) -> tuple[object, float, float]:
    """Run ``make(tag)()`` twice: timed (tag "") and under tracemalloc (tag "_mem", for the peak
    Python/numpy memory; tracemalloc slows Python loops, so it is not timed)."""
    start = time.perf_counter()
    result = make("")()
    wall = time.perf_counter() - start
    tracemalloc.start()
    make("_mem")()
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    return result, wall, peak / 1e6


def row(cells, widths) -> str:
    return "| " + " | ".join(f"{c:<{w}}" if k == 0 else f"{c:>{w}}"
                             for k, (c, w) in enumerate(zip(cells, widths))) + " |"


def rule(widths) -> str:
    return "|" + "|".join("-" * (w + 2) if k == 0 else "-" * (w + 1) + ":"
                          for k, w in enumerate(widths)) + "|"


def bench_index(tmp: str, num_tokens: int, doc_tokens: int, seq: int) -> None:
    a, b = os.path.join(tmp, "syn_a"), os.path.join(tmp, "syn_b")
    n = write_synthetic(a, num_tokens, doc_tokens, 1)
    write_synthetic(b, num_tokens, doc_tokens, 2)
    samples = num_tokens // seq - 1
    cache = os.path.join(tmp, "cache")
    print(f"\n## GPT index build: {num_tokens:,} tokens in {n:,} documents (mean {doc_tokens}), "
          f"--seq-length {seq}, {samples:,} samples (one epoch); peak = Python/numpy "
          f"allocations (tracemalloc)")
    widths = (46, 7, 8)
    print(row(("step", "s", "peak MB"), widths))
    print(rule(widths))
    ds, wall, peak = measure(lambda tag: lambda: IndexedDataset(a))
    print(row(("open .idx/.bin (validate, mmap)", f"{wall:.3f}", f"{peak:.1f}"), widths))
    docs = np.arange(len(ds))

    def gpt(cache_dir):
        return lambda: GPTDataset(ds, docs, samples, seq, 1234, cache_dir=cache_dir)

    g, wall, peak = measure(lambda tag: gpt(cache + tag))
    assert not g.loaded_from_cache
    print(row(("document/sample/shuffle indices, cold", f"{wall:.3f}", f"{peak:.1f}"), widths))
    g, wall, peak = measure(lambda tag: gpt(cache + tag))
    assert g.loaded_from_cache
    print(row(("same, cached (memory-mapped .npy)", f"{wall:.3f}", f"{peak:.1f}"), widths))

    def blend(cache_dir):
        return lambda: build_train_valid_test_datasets(
            ["0.3", a, "0.7", b], "1,0,0", seq, 1234, (samples, 0, 0), cache_dir=cache_dir)[0]

    for label in ("cold", "cached"):
        train, wall, peak = measure(lambda tag: blend(cache + "_blend" + tag))
        assert train.loaded_from_cache == (label == "cached")
        print(row((f"blend 0.3/0.7 of two such datasets, {label}", f"{wall:.3f}", f"{peak:.1f}"),
                  widths))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="20 MB corpus and 1e8 tokens.")
    p.add_argument("--size-mb", type=float, default=None, help="Corpus size (default 200).")
    p.add_argument("--tokens", type=float, default=None, help="Synthetic tokens (default 1e9).")
    p.add_argument("--doc-tokens", type=int, default=2048, help="Mean document length.")
    p.add_argument("--seq-length", type=int, default=2048, help="Sample length.")
    p.add_argument("--skip-preprocess", action="store_true", help="Only the index build.")
    p.add_argument("--skip-tables", action="store_true",
                   help="No Parquet/Arrow runs (they need pyarrow).")
    p.add_argument("--tmpdir", default=None, help="Where the temporary files go.")
    args = p.parse_args()
    size_mb = args.size_mb or (20 if args.quick else 200)
    tokens = int(args.tokens or (1e8 if args.quick else 1e9))
    tmp = tempfile.mkdtemp(prefix="bench_preprocess_", dir=args.tmpdir)
    try:
        if not args.skip_preprocess:
            bench_preprocess(tmp, size_mb, tables=not args.skip_tables)
        bench_index(tmp, tokens, args.doc_tokens, args.seq_length)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
