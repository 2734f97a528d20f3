"""Dense decode products: column-tiled weights against the row layout, A/B in one run.

One token's projections of the 378M LLaMA of ``bench/bench_llamacpp.py`` (8 layers x qkv
2048→3072, o 2048→2048, gate/up 2048→11264, down 5632→2048, each layer its own copy so they come
from DRAM), every row read (the dense product, ``gemv_nonzero`` on a dense input), with the
weights input-major ``[in, out]`` (row layout: a pass of eight rows reads eight streams a row
apart, in row groups whose partial sums are added) and column-tiled ``[out/64, in, 64]``
(``cpu_kernels.tile_dense``: each work unit one contiguous region, summed in registers). The two
alternate ``--rounds`` times, each timing bracketed by a STREAM-like read of the same threads, so
that all see the same machine (its memory bandwidth drifts by tens of percent within minutes).
Prints per weight dtype the median token time of each layout, the weight bytes read per second,
that as a fraction of the bracketing STREAM reads, and the ratio row time / tiled time. (The
decoder tiles 16-bit and int8 weights; fp32 is measured to show why not.)

    .venv/bin/python bench/bench_dense_layout.py [--dtypes fp32 bf16 fp16 int8] [--rounds 6]
        [--isa avx2]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch

from megatron_qsparse.inference import cpu_kernels
from token_projections import LAYERS, SHAPES, kernels_ready, weights as build_weights

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16,
          "int8": torch.int8}


def token_time(weights, xs, reps: int) -> float:
    def token():
        for i, (wt, scale) in enumerate(weights):
            cpu_kernels.gemv_nonzero(xs[i % len(SHAPES)], wt, scale=scale)

    token()
    t = time.perf_counter()
    for _ in range(reps):
        token()
    return (time.perf_counter() - t) / reps


def stream_gbs(buf: torch.Tensor) -> float:
    t = time.perf_counter()
    cpu_kernels.stream_read(buf)
    return buf.numel() * 4 / (time.perf_counter() - t) / 1e9


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dtypes", nargs="+", choices=sorted(DTYPES), default=list(DTYPES))
    p.add_argument("--rounds", type=int, default=6, help="A/B alternations (median).")
    p.add_argument("--reps", type=int, default=5, help="Tokens per timing.")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--isa", choices=cpu_kernels.ISAS,
                   help="Run the kernels with this instruction set (one this CPU has; default: "
                        "the widest), e.g. an AVX2-only CPU's paths on an AVX-512 one.")
    args = p.parse_args()
    if not kernels_ready(args.threads):
        return 0
    if args.isa:
        try:
            cpu_kernels.set_isa(args.isa)
        except ValueError as e:
            p.error(str(e))
    g = torch.Generator().manual_seed(0)
    xs = [torch.randn(d, generator=g) for d, _ in SHAPES]
    stream = torch.ones(256 << 20)  # 1 GB
    stream_gbs(stream)
    print(f"{args.threads} threads, kernel ISA {cpu_kernels.isa()}; {args.rounds} alternations "
          f"of {args.reps} dense tokens, each bracketed by a STREAM-like read; medians\n")
    print("| weights | rows ms | tiled ms | rows GB/s | tiled GB/s | STREAM GB/s "
          "| rows / STREAM | tiled / STREAM | rows / tiled |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    with torch.inference_mode():
        for name in args.dtypes:
            dtype = DTYPES[name]
            rows = build_weights(dtype, g)
            tiled = [(cpu_kernels.on_huge_pages(cpu_kernels.tile_dense(w)), s) for w, s in rows]
            byt = sum(w.numel() * w.element_size() + (0 if s is None else s.numel() * 4)
                      for w, s in rows)
            times = {"rows": [], "tiled": []}
            frac = {"rows": [], "tiled": []}
            streams = []
            for r in range(args.rounds):
                for layout in (("rows", "tiled") if r % 2 == 0 else ("tiled", "rows")):
                    before = stream_gbs(stream)
                    t = token_time(rows if layout == "rows" else tiled, xs, args.reps)
                    bw = 0.5 * (before + stream_gbs(stream))
                    times[layout].append(t)
                    frac[layout].append(byt / t / 1e9 / bw)
                    streams.append(bw)
            a, b = statistics.median(times["rows"]), statistics.median(times["tiled"])
            print(f"| {name} | {a * 1e3:.2f} | {b * 1e3:.2f} | {byt / a / 1e9:.1f} | "
                  f"{byt / b / 1e9:.1f} | {statistics.median(streams):.1f} | "
                  f"{statistics.median(frac['rows']):.2f} | {statistics.median(frac['tiled']):.2f} "
                  f"| {a / b:.3f}x |", flush=True)
            del rows, tiled
    print(f"\n({LAYERS} layers; InferenceModel holds 16-bit and int8 weights of projections "
          "without a selection and of the LM head tiled)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
