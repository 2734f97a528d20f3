#!/usr/bin/env python
"""Decode speed: sparse GEMV vs dense GEMV at 7B LLaMA shapes, and end-to-end tokens/s.

Everything is measured in this one run on this machine (fp32, batch 1, one token), so the
ratios compare like with like; repetitions are interleaved (dense, sparse, dense, sparse, ...) so
a burst of load from other processes hits both columns alike; times are medians after warm-up.

**Part 1, one projection** (7B LLaMA: q/k/v 4096→12288, o 4096→4096, gate/up 4096→2×11008, down
11008→4096, LM head 4096→32000; Gaussian weights and input; S = 0 (dense), 0.4, 0.5, 0.6, 0.7;
decode weights fp32, bf16, fp16, int8 (per-output-channel scales)):

* dense: ``torch.mv(W, x)``, the fp32 weight out-major ``[out, in]`` as the dense model holds it;
* ours: :func:`~megatron_qsparse.inference.cpu_kernels.gemv_topk` — the exact Top-K selection
  of ``x`` *and* the product over the kept rows of the input-major weight, one call (S = 0:
  :func:`~megatron_qsparse.inference.cpu_kernels.gemv_nonzero`, every row, the dense decode);
* speed-up = dense / ours, ideal = 1/(1-S) × 4 / (bytes per weight), and their ratio;
* bandwidth: weight bytes actually read (kept rows × outputs × bytes per weight, + int8 scales)
  / time, against a STREAM-like read (:func:`~megatron_qsparse.inference.cpu_kernels.stream_read`
  of 256 MB on the same threads) timed interleaved with the row: target ≥ 0.8 at every row.
  Every call reads a different copy of its weight (copies total > 300 MB), so weights come from
  DRAM, as in a decode step. ``--extra`` adds 2-bit BitNet ternary weights (``gemv_ternary`` on
  an int8-quantized top-K input).

**Part 2, end to end**: greedy decode tokens/s of the demo model's architecture
(examples/configs/demo_tiny.yaml: 4 layers, 4 heads / 2 KV groups, relu2_glu FFN, tied
embeddings, the 4k SentencePiece vocabulary) dense vs Q-Sparse top-K, same weights (random init;
speed does not depend on training), a 16-token prompt then ``--tokens`` decode steps through
:func:`generate` with its KV cache, on each decode path: the compiled step (one C++ call per
token), layer by layer (one kernel call per projection), and the Q-Sparse reference (kernel off,
the training forward). "x dense" divides by the dense model on the same path (the reference by
the dense layers). At the demo's width 128 the tied LM head is 40% of a token's multiply-adds and
stays dense, so the demo-shaped model is also run at widths where the projections dominate
(``--widths``, default 128, 1024 and 2048).

Usage: ``python bench/bench_decode.py [--repeats N] [--threads N] [--dtypes fp32 int8] [--extra] [--skip-gemv]
[--skip-e2e] [--widths 128 2048] [--tokens 64] [--e2e-repeats 5] [--no-reference]``.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time


import torch  # noqa: E402

from megatron_qsparse.inference import cpu_kernels  # noqa: E402
from megatron_qsparse.sparsity import int8_activation, topk_sparsify  # noqa: E402
from megatron_qsparse.sparsity import keep_count, topk_mask  # noqa: E402

SHAPES = [("qkv", 4096, 12288), ("o", 4096, 4096), ("gate_up", 4096, 2 * 11008),
          ("down", 11008, 4096)]
RATIOS = (0.4, 0.5, 0.6, 0.7)
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def interleaved(fns: list, repeats: int, warmup: int) -> list[float]:
    """Median seconds of each function, calls interleaved."""
    for _ in range(warmup):
        for f in fns:
            f()
    times = [[] for _ in fns]
    for _ in range(repeats):
        for i, f in enumerate(fns):
            t0 = time.perf_counter()
            f()
            times[i].append(time.perf_counter() - t0)
    return [statistics.median(t) for t in times]


DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16, "int8": torch.int8}


class Rotation:
    """Copies of one weight, handed out in turn, so that every call reads its weights from DRAM
    (the copies together exceed the last-level cache several times), as in a real decode step
    where each projection's weights were evicted by the other layers'."""

    def __init__(self, wt: torch.Tensor, total_bytes: int = 320 << 20):
        self.copies = [wt] + [wt.clone() for _ in range(max(0, total_bytes // wt.nbytes))]
        self.i = 0

    def next(self) -> torch.Tensor:
        self.i = (self.i + 1) % len(self.copies)
        return self.copies[self.i]


def bench_gemv(args) -> list[dict]:
    rows = []
    g = torch.Generator().manual_seed(0)
    stream_buf = torch.ones(64 << 20)  # 256 MB: a STREAM-like read, timed beside every row
    hdr = (f"{'layer':8} {'d→n':>12} {'W':>4} {'S':>4} {'dense ms':>9} {'ours ms':>8} "
           f"{'speed-up':>9} {'ideal':>6} {'/ideal':>7} {'GB/s':>6} {'STREAM':>7} {'/STREAM':>8}")
    print(hdr)
    shapes = SHAPES + ([("lm_head", 4096, 32000)] if not args.no_head else [])
    for name, d, n in shapes:
        w = torch.randn(n, d, generator=g)
        x = torch.randn(d, generator=g)
        dense_w = Rotation(w)  # torch.mv on the fp32 out-major weight: the dense reference
        for wname in args.dtypes:
            wdtype = DTYPES[wname]
            if wdtype == torch.int8:
                q, scale = cpu_kernels.quantize_int8(w.t())
            else:
                q, scale = w.t().to(wdtype).contiguous(), None
            rot = Rotation(q)
            for s in args.ratios:
                k = keep_count(d, s)
                if s > 0:
                    xs = x * topk_mask(x, k)
                    ref = xs @ cpu_kernels.dequantize(q, scale)
                    got = cpu_kernels.gemv_topk(x, q, k, scale=scale)

                    def ours(k=k):
                        return cpu_kernels.gemv_topk(x, rot.next(), k, scale=scale)
                else:  # dense: every row, through the same kernel
                    xs = x
                    ref = x @ cpu_kernels.dequantize(q, scale)
                    got = cpu_kernels.gemv_nonzero(x, q, scale=scale)

                    def ours():
                        return cpu_kernels.gemv_nonzero(x, rot.next(), scale=scale)
                # within 1e-4 of sum |x_i W_ij| (the fp32 paths: ~1e-6; int8 on VNNI: int16
                # activations, 2^-16 of each pass's largest |x|)
                bound = 1e-4 * (xs.abs() @ cpu_kernels.dequantize(q, scale).abs()) + 1e-3
                assert bool(((got - ref).abs() <= bound).all()), "kernel disagrees"
                fns = [lambda: torch.mv(dense_w.next(), x), ours,
                       lambda: cpu_kernels.stream_read(stream_buf)]
                t = interleaved(fns, args.repeats, args.warmup)
                read = k * n * q.element_size() + (0 if scale is None else 4 * n)
                gbs = read / t[1] / 1e9
                stream = stream_buf.numel() * 4 / t[2] / 1e9
                ideal = 1.0 / (1.0 - s) * 4 / q.element_size()
                r = {"layer": name, "d": d, "n": n, "w": wname, "S": s, "dense_ms": t[0] * 1e3,
                     "ours_ms": t[1] * 1e3, "speedup": t[0] / t[1], "ideal": ideal,
                     "gbs": gbs, "stream": stream, "frac": gbs / stream}
                print(f"{name:8} {f'{d}→{n}':>12} {wname:>4} {s:4.1f} {r['dense_ms']:9.2f} "
                      f"{r['ours_ms']:8.2f} {r['speedup']:8.2f}x {ideal:5.2f}x "
                      f"{r['speedup'] / ideal:7.2f} {gbs:6.1f} {stream:7.1f} {r['frac']:8.2f}",
                      flush=True)
                rows.append(r)
            del rot, q
        if args.extra:  # BitNet: top-K, int8 activations, 2-bit product (PyTorch sparsifier)
            codes = torch.randint(-1, 2, (n, d), generator=g).float()
            packed = Rotation(cpu_kernels.pack_ternary(codes))
            for s in args.ratios:
                k = keep_count(d, s)

                def ternary(k=k):
                    xq = int8_activation(topk_sparsify(x, k)) if k < d else int8_activation(x)
                    return cpu_kernels.gemv_ternary(xq, packed.next(), n, 0.5)
                t = interleaved([lambda: torch.mv(dense_w.next(), x), ternary], args.repeats,
                                args.warmup)
                print(f"{name:8} {f'{d}→{n}':>12} {'2bit':>4} {s:4.1f} {t[0] * 1e3:9.2f} "
                      f"{t[1] * 1e3:8.2f} {t[0] / t[1]:8.2f}x", flush=True)
            del packed
        del w, dense_w
    worst = min(rows, key=lambda r: r["frac"])
    print(f"worst bandwidth / STREAM: {worst['frac']:.2f} ({worst['layer']} {worst['w']} "
          f"S={worst['S']}; target >= 0.80: {'PASS' if worst['frac'] >= 0.8 else 'FAIL'})")
    sparse = [r for r in rows if r["S"] > 0]
    if sparse:
        w2 = min(r["speedup"] / r["ideal"] for r in sparse)
        print(f"worst speed-up / ideal: {w2:.2f} (ideal = 1/(1-S) x 4 bytes / weight bytes)\n")
    return rows


def demo_configs(width: int):
    """Model config of examples/configs/demo_tiny.yaml at hidden size ``width``; padded vocab."""
    import yaml

    from megatron_qsparse.config import ModelConfig
    from megatron_qsparse.data.tokenizer import build_tokenizer

    with open(os.path.join(ROOT, "examples", "configs", "demo_tiny.yaml")) as fh:
        y = yaml.safe_load(fh)
    tok = build_tokenizer(y["tokenizer-type"], os.path.join(ROOT, y["tokenizer-model"]))
    cfg = ModelConfig(num_layers=y["num-layers"], hidden_size=width,
                      num_attention_heads=y["num-attention-heads"],
                      num_query_groups=y["num-query-groups"], seq_length=y["seq-length"],
                      ffn_type=y["ffn-type"],
                      untie_embeddings_and_output_weights=y["untie-embeddings-and-output-weights"])
    vocab = -(-tok.vocab_size // cfg.make_vocab_size_divisible_by) * cfg.make_vocab_size_divisible_by
    return cfg, vocab


def bench_e2e(args) -> None:
    from megatron_qsparse.config import QSparseConfig
    from megatron_qsparse.inference import InferenceModel, generate
    from megatron_qsparse.model.accounting import count_parameters
    from megatron_qsparse.model.gpt import GPTModel

    print(f"{'width':>5} {'params':>7} {'model':15} {'decode path':15} {'decode tok/s':>13} "
          f"{'x dense':>8}")
    paths = [("compiled step", dict(compiled_step=True)),
             ("layer by layer", dict(compiled_step=False))]
    if not args.no_reference:
        paths.append(("reference", dict(sparse_kernel=False)))
    results = []
    for width in args.widths:
        cfg, vocab = demo_configs(width)
        torch.manual_seed(0)
        dense_model = GPTModel(cfg.with_sparsity(QSparseConfig(mode="none")), vocab)
        n = count_parameters(dense_model)
        state = dense_model.state_dict()
        del dense_model
        prompt = torch.randint(0, vocab, (16,), generator=torch.Generator().manual_seed(1)).tolist()
        models = []  # (label, path, dense label, InferenceModel)
        for path, kw in paths:
            for mode, s in [("none", None)] + [("topk", s) for s in args.e2e_ratios]:
                if mode == "none" and path == "reference":
                    continue  # the dense reference is the dense layer-by-layer path
                m = GPTModel(cfg.with_sparsity(QSparseConfig(mode=mode, ratio=s or 0.5)), vocab)
                m.load_state_dict(state)
                label = "dense" if s is None else f"Q-Sparse S={s}"
                base = "compiled step" if path == "compiled step" else "layer by layer"
                models.append((label, path, base, InferenceModel(m.eval(), **kw)))
        fns = [lambda m=m: generate(m, prompt, args.tokens + 1).decode_tokens_per_second
               for *_, m in models]
        tps = [[] for _ in models]
        for rep in range(args.e2e_repeats + 1):
            for i, f in enumerate(fns):
                v = f()
                if rep:  # the first round is the warm-up
                    tps[i].append(v)
        med = [statistics.median(t) for t in tps]
        dense = {path: v for (label, path, _, _), v in zip(models, med) if label == "dense"}
        for (label, path, base, _), v in zip(models, med):
            print(f"{width:5d} {n / 1e6:6.1f}M {label:15} {path:15} {v:13.1f} "
                  f"{v / dense[base]:7.2f}x", flush=True)
            results.append({"width": width, "model": label, "path": path,
                            "speedup": v / dense[base]})
        del models, fns, state
    demo = [r for r in results if r["width"] == 128 and r["path"] == "compiled step"
            and r["model"] == "Q-Sparse S=0.6"]
    if demo:
        v = demo[0]["speedup"]
        print(f"demo model (width 128), compiled step, S=0.6: {v:.2f}x dense (target >= 1.5: "
              f"{'PASS' if v >= 1.5 else 'FAIL'})")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repeats", type=int, default=10, help="Timed repetitions per GEMV (median).")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--threads", type=int, default=os.cpu_count(), help="torch threads.")
    p.add_argument("--ratios", type=float, nargs="+", default=[0.0, *RATIOS],
                   help="Sparsity ratios of the GEMV part (0: dense, every row).")
    p.add_argument("--dtypes", nargs="+", default=list(DTYPES), choices=list(DTYPES),
                   help="Decode weight storage types of the GEMV part.")
    p.add_argument("--no-head", action="store_true", help="Skip the LM-head shape (4096→32000).")
    p.add_argument("--extra", action="store_true", help="Also 2-bit ternary (BitNet) weights.")
    p.add_argument("--skip-gemv", action="store_true")
    p.add_argument("--skip-e2e", action="store_true")
    p.add_argument("--widths", type=int, nargs="+", default=[128, 1024, 2048],
                   help="Hidden sizes of the demo-shaped model for the end-to-end part.")
    p.add_argument("--e2e-ratios", type=float, nargs="+", default=[0.6])
    p.add_argument("--tokens", type=int, default=64, help="Decode steps per generation.")
    p.add_argument("--e2e-repeats", type=int, default=5, help="Generations per model (median).")
    p.add_argument("--no-reference", action="store_true",
                   help="Skip the Q-Sparse reference path (kernel off) in the end-to-end part.")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    if not cpu_kernels.available():
        print(f"error: the sparse decode kernel is unavailable ({cpu_kernels.unavailable_reason()})",
              file=sys.stderr)
        return 2
    print(f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
          f"{torch.get_num_threads()} torch threads, torch {torch.__version__}, kernel ISA "
          f"{cpu_kernels.isa()} (int8 dense: {cpu_kernels.int8_path()}), fp32, batch 1\n")
    if not args.skip_gemv:
        bench_gemv(args)
    if not args.skip_e2e:
        bench_e2e(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
