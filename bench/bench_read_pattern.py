"""How fast can kept weight rows be read at all? The products' access pattern with no arithmetic.

A decode product reads the rows of its kept inputs: eight rows per pass, each row one
sequential run of ``row bytes``, the rows cut into the contiguous groups (eight on two cores,
shrinking along the rows) that the kernels' threads share (``gemv_core.h``). This benchmark
reads rows of a 1 GB buffer exactly that way with one add per cache line
(:func:`~megatron_qsparse.inference.cpu_kernels.kept_rows_read`), so what it measures is the pattern's own bandwidth, the bound of any loop over those rows:

* ``scattered``: a random ``--keep`` fraction of the rows (Top-K of a real model);
* ``consecutive``: the same number of rows, all adjacent (the dense product's pattern);
* STREAM: the STREAM-like read of the whole buffer (``cpu_kernels.stream_read``), timed right
  before and right after each pattern, whose mean the pattern is compared with.

The default row lengths are those of the 378M model of ``bench/bench_llamacpp.py`` (rows of
2048, 3072 and 11264 outputs, as int8, 16-bit and fp32 weights). Prints the median GB/s and the
median fraction of STREAM over ``--rounds`` alternations (the machine's bandwidth drifts).

    .venv/bin/python bench/bench_read_pattern.py [--row-bytes 2048 4096 ...] [--keep 0.4]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch

from megatron_qsparse.inference import cpu_kernels

MODEL_ROWS = {2048: "o, down", 3072: "qkv", 11264: "gate_up"}  # outputs per row
ELEMENT = {1: "int8", 2: "16-bit", 4: "fp32"}


def default_row_bytes() -> list[int]:
    return sorted({n * e for n in MODEL_ROWS for e in ELEMENT})


def label(row_bytes: int) -> str:
    names = [f"{ELEMENT[e]} {MODEL_ROWS[n]}" for n in MODEL_ROWS for e in ELEMENT
             if n * e == row_bytes]
    return "; ".join(names) if names else ""


def timed(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--row-bytes", nargs="+", type=int, default=default_row_bytes())
    p.add_argument("--keep", type=float, default=0.4, help="Fraction of rows read (1 - S).")
    p.add_argument("--buffer-mb", type=int, default=1024)
    p.add_argument("--rounds", type=int, default=9)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    if not 0 < args.keep <= 1:
        p.error(f"--keep must be in (0, 1], got {args.keep}")
    bad = [b for b in args.row_bytes if b <= 0 or b % 64]
    if bad:
        p.error(f"--row-bytes must be positive multiples of 64 (whole cache lines), got {bad}")
    if not cpu_kernels.available():
        print("the CPU decode kernels are not available here (no compiler?): nothing to measure")
        return 0
    torch.set_num_threads(args.threads)
    total = args.buffer_mb << 20
    buf = cpu_kernels.on_huge_pages(torch.ones(total, dtype=torch.uint8))
    stream = buf.view(torch.float32)
    g = torch.Generator().manual_seed(0)
    print(f"kept-row read pattern, {args.threads} threads, {args.buffer_mb} MB buffer, "
          f"keep {args.keep:g}, {args.rounds} rounds (medians; fractions against the mean of "
          f"the STREAM reads right before and after)")
    print("| row bytes | rows of | pattern | GB/s | STREAM GB/s | of STREAM (quartiles) |")
    print("|---:|---|---|---:|---:|---|")
    for row_bytes in args.row_bytes:
        rows = total // row_bytes
        view = buf[: rows * row_bytes].view(rows, row_bytes)
        nk = max(8, int(round(rows * args.keep)))
        patterns = {
            "scattered": torch.sort(torch.randperm(rows, generator=g)[:nk]).values,
            "consecutive": torch.arange(nk),
        }
        for idx in patterns.values():  # warm-up (and the pages are touched)
            cpu_kernels.kept_rows_read(view, idx)
        cpu_kernels.stream_read(stream)
        res = {name: ([], [], []) for name in patterns}
        for _ in range(args.rounds):
            for name, idx in patterns.items():
                before = total / timed(lambda: cpu_kernels.stream_read(stream)) / 1e9
                bw = nk * row_bytes / timed(lambda: cpu_kernels.kept_rows_read(view, idx)) / 1e9
                after = total / timed(lambda: cpu_kernels.stream_read(stream)) / 1e9
                ref = (before + after) / 2
                res[name][0].append(bw)
                res[name][1].append(ref)
                res[name][2].append(bw / ref)
        for name, (bws, refs, fr) in res.items():
            q = statistics.quantiles(fr, n=4, method="inclusive") if len(fr) > 1 else [fr[0]] * 3
            print(f"| {row_bytes} | {label(row_bytes)} | {name} | {statistics.median(bws):.1f} | "
                  f"{statistics.median(refs):.1f} | {statistics.median(fr):.2f} "
                  f"({q[0]:.2f}-{q[2]:.2f}) |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
