#!/usr/bin/env python
"""Decode speed: sparse GEMV vs dense GEMV at 7B LLaMA shapes, and end-to-end tokens/s.

Everything is measured in this one run on this machine (fp32, batch 1, one token), so the
ratios compare like with like; repetitions are interleaved (dense, sparse, dense, sparse, ...) so
a burst of load from other processes hits both columns alike; times are medians after warm-up.

**Part 1, one projection** (7B LLaMA: q/k/v 4096→12288, o 4096→4096, gate/up 4096→2×11008, down
11008→4096; Gaussian weights and input; S = 0.4, 0.5, 0.6, 0.7):

* dense: ``torch.mv(W, x)``, the fp32 weight out-major ``[out, in]`` as the dense model holds it;
* sparse: :func:`~megatron_qsparse.inference.cpu_kernels.gemv_topk` — the exact Top-K selection
  of ``x`` *and* the product over the kept rows of the input-major weight, one call;
* speed-up = dense / sparse, ideal = 1/(1-S) (the weight bytes read), and their ratio
  (target ≥ 0.8 at every S). ``--extra`` adds the same sparse product with bf16 weights and with
  2-bit BitNet ternary weights (``gemv_ternary`` on an int8-quantized top-K input).

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

Usage: ``python bench/bench_decode.py [--repeats N] [--threads N] [--extra] [--skip-gemv]
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


def bench_gemv(args) -> list[dict]:
    rows = []
    g = torch.Generator().manual_seed(0)
    hdr = (f"{'layer':8} {'d→n':>12} {'S':>4} {'dense ms':>9} {'sparse ms':>10} {'speed-up':>9} "
           f"{'ideal':>6} {'/ideal':>7}")
    if args.extra:
        hdr += f" {'bf16 ms':>8} {'x dense':>8} {'2-bit ms':>9} {'x dense':>8}"
    print(hdr)
    for name, d, n in SHAPES:
        w = torch.randn(n, d, generator=g)
        wt = w.t().contiguous()
        extra = {}
        if args.extra:
            extra["bf16"] = wt.to(torch.bfloat16)
            codes = torch.randint(-1, 2, (n, d), generator=g).float()
            extra["packed"] = cpu_kernels.pack_ternary(codes)
        x = torch.randn(d, generator=g)
        for s in args.ratios:
            k = keep_count(d, s)
            ref = (x * topk_mask(x, k)) @ wt
            got = cpu_kernels.gemv_topk(x, wt, k)
            assert torch.allclose(got, ref, rtol=1e-4, atol=1e-3), "kernel disagrees with reference"
            fns = [lambda: torch.mv(w, x), lambda: cpu_kernels.gemv_topk(x, wt, k)]
            if args.extra:
                wb, packed = extra["bf16"], extra["packed"]

                def ternary(x=x, k=k, packed=packed):  # BitNet: top-K, int8, 2-bit product
                    xq = int8_activation(topk_sparsify(x, k))
                    return cpu_kernels.gemv_ternary(xq, packed, n, 0.5)

                fns += [lambda: cpu_kernels.gemv_topk(x, wb, k), ternary]
            t = interleaved(fns, args.repeats, args.warmup)
            ideal = 1.0 / (1.0 - s)
            r = {"layer": name, "d": d, "n": n, "S": s, "dense_ms": t[0] * 1e3,
                 "sparse_ms": t[1] * 1e3, "speedup": t[0] / t[1], "ideal": ideal}
            line = (f"{name:8} {f'{d}→{n}':>12} {s:4.1f} {r['dense_ms']:9.2f} "
                    f"{r['sparse_ms']:10.2f} {r['speedup']:8.2f}x {ideal:5.2f}x "
                    f"{r['speedup'] / ideal:7.2f}")
            if args.extra:
                line += (f" {t[2] * 1e3:8.2f} {t[0] / t[2]:7.2f}x {t[3] * 1e3:9.2f} "
                         f"{t[0] / t[3]:7.2f}x")
            print(line, flush=True)
            rows.append(r)
        del w, wt, extra
    worst = min(r["speedup"] / r["ideal"] for r in rows)
    print(f"worst speed-up / ideal: {worst:.2f} (target >= 0.80: "
          f"{'PASS' if worst >= 0.8 else 'FAIL'})\n")
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
    p.add_argument("--repeats", type=int, default=20, help="Timed repetitions per GEMV (median).")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--threads", type=int, default=os.cpu_count(), help="torch threads.")
    p.add_argument("--ratios", type=float, nargs="+", default=list(RATIOS))
    p.add_argument("--extra", action="store_true", help="Also bf16 and 2-bit ternary weights.")
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
          f"{cpu_kernels.isa()}, fp32, batch 1\n")
    if not args.skip_gemv:
        bench_gemv(args)
    if not args.skip_e2e:
        bench_e2e(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
