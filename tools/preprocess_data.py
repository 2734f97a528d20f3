#!/usr/bin/env python
"""Tokenize JSON-lines, Parquet or Arrow corpora into Megatron-LM ``.bin``/``.idx`` datasets.

Example (from the repository root)::

    python tools/preprocess_data.py --input examples/data/kjv_sample.jsonl \\
        --output-prefix data/kjv --tokenizer-type SentencePieceTokenizer \\
        --tokenizer-model examples/data/kjv_sp4k.model --append-eod --workers 2

writes ``data/kjv_text_document.bin`` and ``data/kjv_text_document.idx`` (one pair per
``--json-keys`` entry, named as Megatron-LM names them); pass ``data/kjv_text_document`` as
``--data-path`` to training. The files are byte-for-byte what Megatron-LM's
``tools/preprocess_data.py`` writes for the same token ids (uint16 when the vocabulary has fewer
than 65500 ids, else int32), so they move freely between the two code bases.

Input: ``--input`` takes files, directories of shards (searched recursively for
``*.jsonl``/``*.json``/``*.ndjson``, optionally ``.gz``/``.zst``, and ``*.parquet``) and glob
patterns, read in sorted order; compression is recognised by content (``.zst`` needs the
``zstandard`` package). Parquet files (``.parquet``), Arrow IPC files (``.arrow``) and Hugging
Face ``datasets`` folders written by ``save_to_disk`` (their ``data-*.arrow`` shards, in the
dataset's order; a ``DatasetDict`` folder with several splits needs the split's folder, e.g.
``DIR/train``) are read with pyarrow, row group by row group (record batch by record batch): a
row is a document, ``--json-keys`` names columns, a null or non-string value is skipped as in
JSON lines, and the output equals that of the same rows written as JSON lines. Input is streamed
in ~1 MiB blobs of whole lines (or rows) with a bounded number in flight, and the index is
assembled from side files, so memory stays flat for inputs of any size.

Bad lines (blank, invalid UTF-8, invalid JSON, not an object, missing key, non-string or empty
text) are skipped and counted; the first ``--max-skip-reports`` are printed as ``file:line:
reason`` (``file: row N: reason`` for tables, N counted from 0 as pyarrow and ``datasets`` do).
``--strict`` stops at the first one instead (exit status 2, nothing written). A truncated or
corrupt compressed file is reported and the rest of that file skipped, an undecodable Parquet row
group or Arrow record batch is reported and skipped (errors under ``--strict``); a column missing
from a table, or a table whose metadata cannot be read, stops the run before it starts. Outputs
are written under temporary names and renamed only when complete.

``--workers N`` tokenizes in N processes (output order is always the input order).
``--partitions P`` (Megatron-LM's flag) cuts the input into P contiguous parts (tables between
row groups / record batches) processed by separate processes with ``N / P`` workers each, then
merges them in order: the output is identical to ``--partitions 1``. The last line on stdout
summarises the run.
"""

from __future__ import annotations

import argparse
import errno
import os
import queue as queue_module
import shutil
import signal
import sys
import threading
import tempfile
import time
from collections import Counter, deque
from dataclasses import dataclass, field
from multiprocessing import Pool, get_context


import numpy as np  # noqa: E402

from megatron_qsparse.data.corpus import (  # noqa: E402
    BlobReader,
    CorruptInputError,
    Piece,
    check_decoders,
    expand_inputs,
    plan_partitions,
)
from megatron_qsparse.data.encoding import (  # noqa: E402
    BAD_GROUP,
    CORRUPT,
    SKIP_REASONS,
    BlobResult,
    Encoder,
)
from megatron_qsparse.data.indexed_dataset import IndexedDatasetBuilder  # noqa: E402
from megatron_qsparse.data.tables import (  # noqa: E402
    KIND_NAMES,
    TablePiece,
    TableReader,
    table_info,
    table_kind,
)
from megatron_qsparse.data.tokenizer import TOKENIZER_TYPES, build_tokenizer  # noqa: E402

BLOB_BYTES = 1 << 20  # input bytes per task sent to a worker

class InputError(Exception):
    """A bad input under ``--strict`` (or an unusable input): one line, ``file:line: reason``."""


def get_parser() -> argparse.ArgumentParser:
    """The command-line interface (Megatron-LM flag names and meanings)."""
    p = argparse.ArgumentParser(
        description="Tokenize .jsonl(.gz/.zst), Parquet and Hugging Face datasets (save_to_disk) "
                    "corpora into Megatron .bin/.idx datasets.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    g = p.add_argument_group("input data")
    g.add_argument("--input", required=True, nargs="+",
                   help="JSON-lines files (one document per line; .jsonl, .jsonl.gz, .jsonl.zst), "
                        "Parquet or Arrow IPC files (.parquet, .arrow; one document per row), "
                        "datasets save_to_disk folders "
                        "(a DatasetDict's split folder, e.g. DIR/train), directories of shards "
                        "(.jsonl/.json/.ndjson[.gz|.zst], .parquet), or glob patterns; read in "
                        "sorted order.")
    g.add_argument("--json-keys", nargs="+", default=["text"],
                   help="Keys (Parquet/Arrow: columns) to tokenize; one output dataset per key (a "
                        "line or row is skipped for all keys if any key is unusable).")
    g = p.add_argument_group("tokenizer")
    g.add_argument("--tokenizer-type", default="SentencePieceTokenizer", choices=TOKENIZER_TYPES,
                   help="Tokenizer implementation.")
    g.add_argument("--tokenizer-model", default=None,
                   help="SentencePiece .model file (not needed for ByteTokenizer).")
    g.add_argument("--append-eod", action="store_true",
                   help="Append the end-of-document id to every document.")
    g = p.add_argument_group("output data")
    g.add_argument("--output-prefix", required=True,
                   help="Output path prefix; writes PREFIX_{key}_document.bin/.idx.")
    g = p.add_argument_group("runtime")
    g.add_argument("--workers", type=int, default=1,
                   help="Tokenizer processes in all (output order is the input order).")
    g.add_argument("--partitions", type=int, default=1,
                   help="Split the input into this many contiguous parts, processed in parallel "
                        "(--workers / --partitions workers each) and merged in order; the output "
                        "equals --partitions 1.")
    g.add_argument("--keep-sequential-samples", action="store_true",
                   help="Accepted for Megatron-LM compatibility; input order is always kept.")
    g.add_argument("--log-interval", type=int, default=1000,
                   help="Print a progress line to stderr every this many input lines or rows "
                        "(0: never).")
    g.add_argument("--strict", action="store_true",
                   help="Stop at the first bad line or row (file:line: reason) instead of "
                        "skipping it.")
    g.add_argument("--allow-empty", action="store_true",
                   help="Write the dataset even when no document came out of the input (by "
                   "default that is an error: exit status 2, nothing written).")
    g.add_argument("--max-skip-reports", type=int, default=10,
                   help="Print file:line: reason for this many skipped lines or rows (all are "
                        "counted).")
    return p


# ---------------------------------------------------------------------------------------------
# encoding (runs in the workers; the rules live in megatron_qsparse.data.encoding)
# ---------------------------------------------------------------------------------------------
_WORKER: Encoder | None = None


def _init_worker(json_keys, tokenizer_type, tokenizer_model, append_eod) -> None:
    global _WORKER
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the main process's to handle
    _WORKER = Encoder(json_keys, build_tokenizer(tokenizer_type, tokenizer_model), append_eod)


def _encode_in_worker(task) -> BlobResult:
    assert _WORKER is not None
    return _WORKER.encode_task(task)


def bounded_imap(pool, fn, tasks, max_in_flight: int):
    """Ordered ``(meta, fn(arg))`` for ``(meta, arg)`` in ``tasks``, at most ``max_in_flight`` queued.

    Unlike ``Pool.imap`` (whose feeder thread drains the whole input iterator into memory), the
    next task is read only when a slot is free, so memory is bounded for inputs of any size.
    ``arg=None`` yields ``(meta, None)`` in order without calling ``fn``; ``pool=None`` runs
    ``fn`` in this process.
    """
    if pool is None:
        for meta, arg in tasks:
            yield meta, (None if arg is None else fn(arg))
        return
    pending: deque = deque()
    for meta, arg in tasks:
        pending.append((meta, None if arg is None else pool.apply_async(fn, (arg,))))
        while len(pending) >= max_in_flight:
            meta0, res = pending.popleft()
            yield meta0, (None if res is None else res.get())
    while pending:
        meta0, res = pending.popleft()
        yield meta0, (None if res is None else res.get())


# ---------------------------------------------------------------------------------------------
# one partition: read pieces, encode, write builders
# ---------------------------------------------------------------------------------------------
@dataclass
class Job:
    """Everything a partition needs (picklable, sent to partition processes)."""

    json_keys: list
    tokenizer_type: str
    tokenizer_model: str | None
    append_eod: bool
    strict: bool
    log_interval: int
    max_skip_reports: int
    workers: int


@dataclass
class Stats:
    """Counters of a run or a partition."""

    lines: int = 0
    docs: int = 0
    bytes: int = 0
    raw_done: int = 0
    tokens: Counter = field(default_factory=Counter)
    skipped: Counter = field(default_factory=Counter)

    def to_dict(self) -> dict:
        return {"lines": self.lines, "docs": self.docs, "bytes": self.bytes,
                "raw_done": self.raw_done, "tokens": dict(self.tokens),
                "skipped": dict(self.skipped)}

    @classmethod
    def from_dict(cls, d: dict) -> "Stats":
        return cls(d["lines"], d["docs"], d["bytes"], d["raw_done"], Counter(d["tokens"]),
                   Counter(d["skipped"]))

    def add(self, other: "Stats") -> None:
        self.lines += other.lines
        self.docs += other.docs
        self.bytes += other.bytes
        self.raw_done += other.raw_done
        self.tokens.update(other.tokens)
        self.skipped.update(other.skipped)


class Reporter:
    """Prints progress and skipped lines (in this process)."""

    def __init__(self, job: Job, raw_total: int, start: float):
        self.job, self.raw_total, self.start = job, raw_total, start
        self.reported = 0

    def bad_line(self, text: str) -> None:
        if self.reported < self.job.max_skip_reports:
            print(f"warning: {text} (skipped)", file=sys.stderr)
        elif self.reported == self.job.max_skip_reports:
            print("warning: further bad lines are counted but not shown "
                  "(see the summary; --max-skip-reports)", file=sys.stderr)
        self.reported += 1

    def progress(self, stats: Stats) -> None:
        print(progress_line(stats, self.raw_total, time.perf_counter() - self.start),
              file=sys.stderr, flush=True)


class QueueReporter:
    """Sends progress and skipped lines of a partition process to the parent."""

    def __init__(self, queue, index: int):
        self.queue, self.index = queue, index

    def bad_line(self, text: str) -> None:
        self.queue.put(("bad", self.index, text))

    def progress(self, stats: Stats) -> None:
        self.queue.put(("progress", self.index, stats.to_dict()))


def progress_line(stats: Stats, raw_total: int, elapsed: float) -> str:
    """``processed N lines (...) | P% of X MB | docs/s | MB/s | tokens/s | ETA``."""
    elapsed = max(elapsed, 1e-9)
    tokens = sum(stats.tokens.values())
    parts = [f"processed {stats.lines:,} lines ({stats.docs:,} documents, "
             f"{sum(stats.skipped.values()):,} skipped, {tokens:,} tokens)"]
    if raw_total > 0:
        frac = min(stats.raw_done / raw_total, 1.0)
        parts.append(f"{100 * frac:5.1f}% of {raw_total / 1e6:,.1f} MB input")
    parts += [f"{stats.lines / elapsed:,.0f} docs/s", f"{stats.bytes / elapsed / 1e6:.2f} MB/s",
              f"{tokens / elapsed:,.0f} tokens/s"]
    if raw_total > 0 and 0 < stats.raw_done < raw_total:
        eta = elapsed * (raw_total - stats.raw_done) / stats.raw_done
        parts.append(f"ETA {int(eta) // 3600}:{int(eta) % 3600 // 60:02d}:{int(eta) % 60:02d}")
    return " | ".join(parts)


def process_pieces(pieces: list[Piece], job: Job, builders: dict, reporter,
                   encoder: Encoder | None = None) -> Stats:
    """Read ``pieces`` in order, tokenize with ``job.workers`` processes, append to ``builders``.

    Raises:
        InputError: under ``--strict``, at the first bad line or unreadable file.
    """
    stats = Stats()

    def tasks():
        raw_base = 0  # on-disk bytes of the pieces before the current one
        for piece in pieces:
            if isinstance(piece, TablePiece):
                reader = TableReader(piece, job.json_keys, BLOB_BYTES)
                for block in reader:
                    done = raw_base + reader.raw_done
                    if block.error:
                        yield ("corrupt", block.error, done), None
                    else:
                        yield (piece, block.first_row, done), block
                raw_base += reader.raw_total
                continue
            reader = BlobReader(piece, BLOB_BYTES)
            try:
                for first, blob in reader:
                    yield (piece, first, raw_base + reader.raw_done), blob
            except CorruptInputError as e:
                yield ("corrupt", e, raw_base + reader.raw_total), None
            raw_base += reader.raw_total

    pool = None
    try:
        if job.workers > 1:
            pool = Pool(job.workers, initializer=_init_worker,
                        initargs=(job.json_keys, job.tokenizer_type, job.tokenizer_model,
                                  job.append_eod))
            fn = _encode_in_worker
        else:
            if encoder is None:
                encoder = Encoder(job.json_keys,
                                  build_tokenizer(job.tokenizer_type, job.tokenizer_model),
                                  job.append_eod)
            fn = encoder.encode_task
        next_report = job.log_interval
        for meta, result in bounded_imap(pool, fn, tasks(), max(2, 3 * job.workers)):
            stats.raw_done = meta[2]  # input read up to the end of this blob
            if meta[0] == "corrupt":
                e = meta[1]
                if job.strict:
                    raise InputError(str(e))
                stats.skipped[BAD_GROUP if isinstance(e, str) else CORRUPT] += 1
                reporter.bad_line(str(e))
                continue
            piece, first, _ = meta
            table = isinstance(piece, TablePiece)
            stats.lines += result.num_lines
            stats.bytes += result.num_bytes
            for i, reason, message in result.skips:
                where = f"{piece.path}: row {first + i}" if table else f"{piece.path}:{first + i}"
                if job.strict:
                    what = "row" if table else "line"
                    raise InputError(f"{where}: {message}; fix or drop the {what}, or leave out "
                                     f"--strict to skip and count bad {what}s")
                stats.skipped[reason] += 1
                reporter.bad_line(f"{where}: {message}")
            for key, (flat, lengths) in result.tokens.items():
                builders[key].add_documents(flat, lengths)
                stats.tokens[key] += int(flat.size)
            stats.docs += result.num_lines - len(result.skips)
            if job.log_interval > 0 and stats.lines >= next_report:
                reporter.progress(stats)
                next_report = (stats.lines // job.log_interval + 1) * job.log_interval
        if pool is not None:
            pool.close()
            pool.join()
            pool = None
    finally:
        if pool is not None:
            _stop_pool(pool)
    return stats


def _stop_pool(pool, timeout: float = 2.0) -> None:
    """``pool.terminate()`` and ``join()``, bounded (the interrupted path: Ctrl-C, SIGTERM, an
    error). CPython's ``Pool.terminate`` can hang for ever: it stops the workers, then joins its
    task-handler thread, which may be blocked writing a large task (a 1 MB blob of input)
    into the pipe those workers no longer read (seen here: about 1 in 30 Ctrl-C'd runs). So after
    ``timeout`` seconds the workers are killed if still alive (they hold no output: the builders
    are this process's) and the tool goes on to remove its temporary files and exit; the stuck
    thread and the pool's own threads are daemons, so the exit does not wait for them."""
    workers = list(getattr(pool, "_pool", []))
    stopper = threading.Thread(target=lambda: (pool.terminate(), pool.join()), daemon=True)
    stopper.start()
    stopper.join(timeout)
    if stopper.is_alive():
        for proc in workers:
            if proc.exitcode is None:
                proc.kill()


def output_prefix_for(output_prefix: str, key: str) -> str:
    """Megatron-LM's output naming: ``{output_prefix}_{key}_document``."""
    return f"{output_prefix}_{key}_document"


def _partition_main(index: int, pieces: list[Piece], shard: str, job: Job, dtype, queue) -> None:
    """Body of one ``--partitions`` process: writes ``{shard}_{key}_document`` and reports."""
    signal.signal(signal.SIGTERM, _exit_on_sigterm)  # run the cleanup (pool, temporary files)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # on Ctrl-C the parent terminates us
    builders = {}
    try:
        for key in job.json_keys:
            builders[key] = IndexedDatasetBuilder(output_prefix_for(shard, key), dtype)
        stats = process_pieces(pieces, job, builders, QueueReporter(queue, index))
        for builder in builders.values():
            builder.finalize()
        queue.put(("done", index, stats.to_dict()))
    except BaseException as e:  # report everything; the parent turns it into one line
        for builder in builders.values():
            builder.abort()
        if isinstance(e, SystemExit):
            # terminated by the parent, which no longer reads the queue: exiting must not wait
            # for the queue's feeder thread to flush (that would hang both processes)
            queue.cancel_join_thread()
            raise
        message = str(e) if isinstance(e, (InputError, ValueError)) else f"{type(e).__name__}: {e}"
        queue.put(("error", index, message))
        sys.exit(1)


def run_partitions(plan: list[list[Piece]], job: Job, dtype, outputs: dict, reporter: Reporter,
                   out_dir: str) -> Stats:
    """Process each part of ``plan`` in its own process, then merge the shards in order."""
    ctx = get_context()
    queue = ctx.Queue()
    tmpdir = tempfile.mkdtemp(prefix=".preprocess_partitions.", dir=out_dir)
    procs = []
    try:
        shards = [os.path.join(tmpdir, f"part{k:05d}") for k in range(len(plan))]
        for k, pieces in enumerate(plan):
            proc = ctx.Process(target=_partition_main,
                               args=(k, pieces, shards[k], job, dtype, queue))
            proc.start()
            procs.append(proc)
        latest = {k: Stats() for k in range(len(plan))}
        done: dict[int, Stats] = {}
        next_report = job.log_interval
        while len(done) < len(plan):
            try:
                kind, k, payload = queue.get(timeout=0.2)
            except queue_module.Empty:  # check for partitions that died silently
                for k, proc in enumerate(procs):
                    if k not in done and not proc.is_alive() and proc.exitcode not in (0, None):
                        raise InputError(f"partition {k} exited with code {proc.exitcode} "
                                         f"(out of memory?)") from None
                continue
            if kind == "error":
                raise InputError(payload)
            if kind == "bad":
                reporter.bad_line(payload)
            elif kind in ("progress", "done"):
                latest[k] = Stats.from_dict(payload)
                if kind == "done":
                    done[k] = latest[k]
                total = Stats()
                for s in latest.values():
                    total.add(s)
                if kind == "progress" and job.log_interval > 0 and total.lines >= next_report:
                    reporter.progress(total)
                    next_report = (total.lines // job.log_interval + 1) * job.log_interval
        for proc in procs:
            proc.join()
        print(f"merging {len(plan)} partitions", file=sys.stderr)
        for key, prefix in outputs.items():
            with IndexedDatasetBuilder(prefix, dtype) as builder:
                for shard in shards:
                    builder.add_index(output_prefix_for(shard, key))
        total = Stats()
        for s in done.values():
            total.add(s)
        return total
    finally:
        for proc in procs:
            if proc.is_alive():
                proc.terminate()
        for proc in procs:
            proc.join(timeout=30)
            if proc.is_alive():  # stuck in its own teardown: do not wait for ever
                proc.kill()
                proc.join()
        shutil.rmtree(tmpdir, ignore_errors=True)


# ---------------------------------------------------------------------------------------------
# main
# ---------------------------------------------------------------------------------------------
def _exit_on_sigterm(signum, frame):
    raise SystemExit(128 + signum)


def _no_documents(stats: Stats, args) -> str:
    skipped = ", ".join(f"{r}: {stats.skipped[r]}" for r in SKIP_REASONS if stats.skipped[r])
    return (f"no documents came out of the input ({stats.lines} lines read, "
            f"{sum(stats.skipped.values())} skipped{': ' + skipped if skipped else ''}); nothing "
            f"was written; check --input and --json-keys {' '.join(args.json_keys)}, or pass "
            "--allow-empty to write an empty dataset")


def _fail(message: str) -> int:
    print(f"error: {message}", file=sys.stderr)
    return 2


def main(argv: list[str] | None = None) -> int:
    """Run the tool; returns the exit status (0 ok, 2 usage or input error).

    SIGTERM (a cluster job being cancelled) stops it like Ctrl-C: workers are stopped and the
    temporary files removed.
    """
    if threading.current_thread() is not threading.main_thread():
        return _run(argv)
    previous = signal.signal(signal.SIGTERM, _exit_on_sigterm)
    try:
        return _run(argv)
    finally:
        signal.signal(signal.SIGTERM, previous)


def _run(argv: list[str] | None) -> int:
    args = get_parser().parse_args(argv)
    if args.workers < 1:
        return _fail(f"--workers must be at least 1, got {args.workers}")
    if args.partitions < 1:
        return _fail(f"--partitions must be at least 1, got {args.partitions}")
    if args.partitions > 1 and args.workers % args.partitions:
        return _fail(f"--workers {args.workers} is not a multiple of --partitions "
                     f"{args.partitions}; each partition gets --workers / --partitions workers")
    if args.max_skip_reports < 0:
        return _fail(f"--max-skip-reports must be >= 0, got {args.max_skip_reports}")
    if len(set(args.json_keys)) != len(args.json_keys):
        return _fail(f"--json-keys has duplicates: {args.json_keys}")
    try:
        files = expand_inputs(args.input, tables=True)
        kinds = {f: table_kind(f) for f in files}
        tables = {f: table_info(f, k, args.json_keys) for f, k in kinds.items() if k}
        check_decoders([f for f in files if f not in tables])
        tokenizer = build_tokenizer(args.tokenizer_type, args.tokenizer_model)
        plan = plan_partitions(files, args.partitions, tables)
    except (ValueError, OSError) as e:
        return _fail(str(e))
    out_dir = os.path.dirname(os.path.abspath(args.output_prefix))
    try:
        os.makedirs(out_dir, exist_ok=True)
    except OSError as e:
        return _fail(f"cannot create output directory {out_dir!r}: {e.strerror}")
    encoder = Encoder(args.json_keys, tokenizer, args.append_eod)
    dtype = encoder.dtype
    raw_total = sum(os.path.getsize(f) for f in files)
    job = Job(list(args.json_keys), args.tokenizer_type, args.tokenizer_model, args.append_eod,
              args.strict, args.log_interval, args.max_skip_reports,
              max(1, args.workers // len(plan)) if len(plan) > 1 else args.workers)
    kind_counts = Counter(KIND_NAMES[k] for k in kinds.values() if k)
    table_text = "".join(f", {n} {kind}" for kind, n in sorted(kind_counts.items())) + (
        f" ({sum(t.rows for t in tables.values()):,} rows)" if tables else "")
    print(f"input: {len(files)} file(s){table_text}, {raw_total / 1e6:,.1f} MB on disk; tokenizer "
          f"{tokenizer.name}: vocab {tokenizer.vocab_size}, eod {tokenizer.eod}, dtype "
          f"{np.dtype(dtype).name}; {len(plan)} partition(s) x {job.workers} worker(s)",
          file=sys.stderr)

    outputs = {k: output_prefix_for(args.output_prefix, k) for k in args.json_keys}
    start = time.perf_counter()
    reporter = Reporter(job, raw_total, start)
    builders: dict[str, IndexedDatasetBuilder] = {}
    try:
        if len(plan) == 1:
            try:
                for key, prefix in outputs.items():
                    builders[key] = IndexedDatasetBuilder(prefix, dtype)
                stats = process_pieces(plan[0], job, builders, reporter, encoder)
                if stats.docs == 0 and not args.allow_empty:
                    raise InputError(_no_documents(stats, args))
                for builder in builders.values():
                    builder.finalize()
            except BaseException:
                for builder in builders.values():
                    builder.abort()
                raise
        else:
            stats = run_partitions(plan, job, dtype, outputs, reporter, out_dir)
            if stats.docs == 0 and not args.allow_empty:
                for prefix in outputs.values():
                    for path in (prefix + ".bin", prefix + ".idx"):
                        if os.path.exists(path):
                            os.remove(path)
                raise InputError(_no_documents(stats, args))
    except (InputError, ValueError) as e:
        return _fail(str(e))
    except OSError as e:  # a read-only or full output directory: one line, temporaries removed
        name = errno.errorcode.get(e.errno or 0, "")
        return _fail(f"cannot write the dataset under {out_dir}: {e.strerror or e}"
                     f"{' (' + name + ')' if name else ''}; nothing was written; free space "
                     "there or pass a writable --output-prefix")
    except KeyboardInterrupt:
        print("error: interrupted; nothing was written (temporary files removed)",
              file=sys.stderr)
        return 130

    elapsed = max(time.perf_counter() - start, 1e-9)
    tokens = sum(stats.tokens.values())
    skip_text = ", ".join(f"{r}: {stats.skipped[r]}" for r in SKIP_REASONS
                          if stats.skipped[r]) or "none"
    per_key = ("" if len(args.json_keys) == 1 else
               " (" + ", ".join(f"{k}: {stats.tokens[k]}" for k in args.json_keys) + ")")
    out_text = ", ".join(p + ".{bin,idx}" for p in outputs.values())
    print(f"done: {stats.docs} documents, {tokens} tokens{per_key}, skipped "
          f"{sum(stats.skipped.values())} ({skip_text}) in {elapsed:.2f} s "
          f"({stats.lines / elapsed:.0f} docs/s, {stats.bytes / elapsed / 1e6:.2f} MB/s, "
          f"{tokens / elapsed:.0f} tokens/s) -> {out_text}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
