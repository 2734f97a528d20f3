#!/usr/bin/env python
"""Cost of choosing the Top-K mask, against the matmul it feeds (same run, same machine).

For 7B LLaMA input widths (4096 for q/k/v/o/gate/up, 11008 for down) and a batch of tokens, prints
the median time of:

* ``matmul``      ``x @ W.T`` with ``W`` of shape ``[out, d]`` (the baseline, ratio 1.00);
* ``topk_mask``   our exact selection (ties to the lower index) — what training uses;
* ``topk+scatter`` plain ``torch.topk`` + scatter (ties not deterministic), for reference;
* ``sparsifier``  the full Sparsifier forward (mask + apply, density recording off / on).

Usage: ``python bench/bench_topk.py [--tokens 2048] [--ratio 0.4] [--out 4096] [--repeats 7]``
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

from megatron_qsparse.config import QSparseConfig  # noqa: E402
from megatron_qsparse.sparsity import Sparsifier, keep_count, set_recording, topk_mask  # noqa: E402


def median_ms(fn, repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return 1000 * statistics.median(times)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tokens", type=int, default=2048, help="Tokens per batch.")
    p.add_argument("--ratio", type=float, default=0.4, help="Sparsity ratio S.")
    p.add_argument("--out", type=int, default=4096, help="Output width of the matmul.")
    p.add_argument("--widths", type=int, nargs="+", default=[4096, 11008], help="Input widths d.")
    p.add_argument("--repeats", type=int, default=7, help="Timed repetitions (median).")
    args = p.parse_args()
    torch.manual_seed(0)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, fp32, "
          f"{args.tokens} tokens, S = {args.ratio}, matmul output width {args.out}")
    print(f"{'d':>6} {'method':<22} {'ms':>9} {'vs matmul':>10}")
    for d in args.widths:
        x = torch.randn(args.tokens, d)
        w = torch.randn(args.out, d)
        k = keep_count(d, args.ratio)
        sp = Sparsifier(QSparseConfig(mode="topk", ratio=args.ratio), "qkv", 0)

        def scatter():
            idx = x.abs().topk(k, dim=-1, sorted=False).indices
            return torch.zeros_like(x).scatter_(-1, idx, x.gather(-1, idx))

        def sparsify(on: bool):
            set_recording(sp, on)
            return sp(x)

        base = median_ms(lambda: x @ w.T, args.repeats)
        rows = [("matmul", base),
                ("topk_mask", median_ms(lambda: topk_mask(x, k), args.repeats)),
                ("topk+scatter", median_ms(scatter, args.repeats)),
                ("sparsifier", median_ms(lambda: sparsify(False), args.repeats)),
                ("sparsifier+density", median_ms(lambda: sparsify(True), args.repeats))]
        for name, ms in rows:
            print(f"{d:>6} {name:<22} {ms:>9.1f} {ms / base:>10.2f}")


if __name__ == "__main__":
    main()
