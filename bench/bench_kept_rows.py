"""Does the scatter of the kept rows cost bandwidth? The sparse GEMV on the same number of kept
rows, chosen three ways.

One token's projections of the 378M LLaMA of ``bench/bench_llamacpp.py`` (8 layers x qkv
2048→3072, o 2048→2048, gate/up 2048→11264, down 5632→2048, each layer its own weights so they
come from DRAM) at S = ``--sparsity`` through ``gemv_topk``, with the input made so that Top-K
keeps (a) random rows, as a trained model does, (b) random pairs of adjacent rows, (c) the first
rows, all contiguous (int8 on its fp32 path for all three). Patterns alternate ``--rounds`` times (the machine's bandwidth drifts);
prints median token time, weight bytes read per second, and each pattern's speed relative to
random.

    .venv/bin/python bench/bench_kept_rows.py [--dtypes fp32 bf16 fp16 int8] [--sparsity 0.6]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch

from megatron_qsparse.inference import cpu_kernels
from megatron_qsparse.sparsity import keep_count
from token_projections import LAYERS, SHAPES, kernels_ready, weights as build_weights

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16, "int8": torch.int8}


def inputs(d: int, k: int, pattern: str, g: torch.Generator) -> torch.Tensor:
    """An input whose Top-K (k of d) is the given pattern of rows."""
    if pattern == "random":
        return torch.randn(d, generator=g)
    x = torch.randn(d, generator=g) * 0.01
    if pattern == "contiguous":
        x[:k] = 10.0 + torch.rand(k, generator=g)
    else:  # pairs of adjacent rows
        starts = torch.sort(torch.randperm(d // 2, generator=g)[: k // 2]).values * 2
        x[starts] = 10.0 + torch.rand(starts.numel(), generator=g)
        x[starts + 1] = 10.0 + torch.rand(starts.numel(), generator=g)
        if k % 2:  # one more row, in a pair not taken
            free = torch.ones(d, dtype=torch.bool)
            free[starts] = free[starts + 1] = False
            x[int(free.nonzero()[0])] = 10.0
    return x


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dtypes", nargs="+", default=list(DTYPES), choices=list(DTYPES))
    p.add_argument("--sparsity", type=float, default=0.6)
    p.add_argument("--rounds", type=int, default=4)
    p.add_argument("--reps", type=int, default=6, help="Tokens per timing.")
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    if not kernels_ready(args.threads):
        return 0
    g = torch.Generator().manual_seed(0)
    # contiguous kept rows would take the VNNI path of dense int8 products: the fp32 path for
    # every pattern, so that only the pattern differs
    prev = cpu_kernels.set_int8_vnni("off")
    print(f"{args.threads} threads, kernel ISA {cpu_kernels.isa()}, int8 on its fp32 path, "
          f"S = {args.sparsity:g}, medians of {args.rounds}\n")
    print("| weights | kept rows | token ms | GB/s | vs random |")
    print("|---|---|---:|---:|---:|")
    patterns = ("random", "pairs", "contiguous")
    for name in args.dtypes:
        dt = DTYPES[name]
        weights = build_weights(dt, g)
        ks = [keep_count(d, args.sparsity) for d, _ in SHAPES]
        xs = {pat: [inputs(d, k, pat, g) for (d, _), k in zip(SHAPES, ks)] for pat in patterns}
        times = {pat: [] for pat in patterns}
        with torch.inference_mode():
            for _ in range(args.rounds):
                for pat in patterns:
                    def token(pat=pat):
                        for i, (wt, scale) in enumerate(weights):
                            j = i % len(SHAPES)
                            cpu_kernels.gemv_topk(xs[pat][j], wt, ks[j], scale=scale)
                    token()
                    t = time.perf_counter()
                    for _ in range(args.reps):
                        token()
                    times[pat].append((time.perf_counter() - t) / args.reps)
        byt = LAYERS * sum(k * n for k, (_, n) in zip(ks, SHAPES)) * weights[0][0].element_size()
        base = statistics.median(times["random"])
        for pat in patterns:
            t = statistics.median(times[pat])
            print(f"| {name} | {pat} | {t * 1e3:.2f} | {byt / t / 1e9:.1f} | {base / t:.3f}x |",
                  flush=True)
        del weights
    cpu_kernels.set_int8_vnni(prev)
    return 0


if __name__ == "__main__":
    sys.exit(main())
