"""int8 decode weights: the AVX-512 VNNI path against the fp32-activation path, A/B in one run.

One token's projections of the 378M LLaMA of ``bench/bench_llamacpp.py`` (8 layers x qkv
2048→3072, o 2048→2048, gate/up 2048→11264, down 5632→2048, int8 per-output-channel weights,
each layer its own copy so they come from DRAM) through the sparse GEMV, dense (every row) and at
the given sparsities (the VNNI path forced on scattered rows too, ``set_int8_vnni("all")``),
alternating the two paths ``--rounds`` times so that both see the same
machine (its memory bandwidth drifts by tens of percent within minutes). Prints the median token
time of each path, the weight bytes read per second, and the ratio fp32-path time / VNNI time.
Exits 0 without VNNI.

    .venv/bin/python bench/bench_int8_path.py [--sparsities 0 0.6] [--rounds 4] [--threads 2]
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



def token_time(weights, xs, s: float, reps: int) -> float:
    def token():
        for i, (wt, scale) in enumerate(weights):
            x = xs[i % len(SHAPES)]
            if s == 0:
                cpu_kernels.gemv_nonzero(x, wt, scale=scale)
            else:
                cpu_kernels.gemv_topk(x, wt, keep_count(x.numel(), s), scale=scale)

    token()
    t = time.perf_counter()
    for _ in range(reps):
        token()
    return (time.perf_counter() - t) / reps


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sparsities", nargs="+", type=float, default=[0.0, 0.6])
    p.add_argument("--rounds", type=int, default=4, help="A/B alternations (median).")
    p.add_argument("--reps", type=int, default=10, help="Tokens per timing.")
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    if not kernels_ready(args.threads):
        return 0
    prev = cpu_kernels.set_int8_vnni("all")  # sparse rows too: both paths at every S
    if cpu_kernels.int8_path() != "vnni":
        print("this CPU has no AVX-512 VNNI: int8 weights take the fp32 path only; nothing to do")
        return 0
    g = torch.Generator().manual_seed(0)
    weights = build_weights(torch.int8, g)
    xs = [torch.randn(d, generator=g) for d, _ in SHAPES]
    stream = torch.randn(64 << 20, generator=g)
    t = time.perf_counter()
    cpu_kernels.stream_read(stream)
    gbs = stream.numel() * 4 / (time.perf_counter() - t) / 1e9
    print(f"{args.threads} threads, kernel ISA {cpu_kernels.isa()}, STREAM-like read "
          f"{gbs:.1f} GB/s; {args.rounds} alternations of {args.reps} tokens, medians\n")
    print("| S | fp32 path ms | VNNI path ms | fp32 GB/s | VNNI GB/s | fp32 / VNNI |")
    print("|---:|---:|---:|---:|---:|---:|")
    with torch.inference_mode():
        for s in args.sparsities:
            times = {False: [], True: []}
            for _ in range(args.rounds):
                for on in (False, True):
                    cpu_kernels.set_int8_vnni("all" if on else "off")
                    times[on].append(token_time(weights, xs, s, args.reps))
            byt = LAYERS * sum((d if s == 0 else keep_count(d, s)) * n for d, n in SHAPES)
            a, b = statistics.median(times[False]), statistics.median(times[True])
            print(f"| {s:g} | {a * 1e3:.2f} | {b * 1e3:.2f} | {byt / a / 1e9:.1f} | "
                  f"{byt / b / 1e9:.1f} | {a / b:.3f}x |", flush=True)
    cpu_kernels.set_int8_vnni(prev)
    print("\nBy default (set_int8_vnni('dense')) only dense products take the VNNI path.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
