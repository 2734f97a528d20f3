#!/usr/bin/env python
"""Eager vs ``--torch-compile`` training step, dense and Q-Sparse, in the same run.

One training step = forward + backward + AdamW (torch's foreach implementation) of the demo
model's shape (examples/configs/demo_tiny.yaml: 4 blocks, width 128, GQA 4/2 heads, relu2_glu,
sequence 128, micro-batch 16, vocabulary 4096). Compiled = every transformer block compiled as
``--torch-compile`` does (``training.setup.compile_blocks``). Variants: dense (``--qsparse-mode
none``), top-K S = 0.4, Block 2:4, BitNet b1.58 + top-K S = 0.4. Each step is timed after warm-up
steps (compilation included there); the table reports medians and the ratios:

* ``speed-up``: eager / compiled of the same variant;
* ``x dense``: a variant's time / the dense model's time, same mode (eager or compiled).

Targets on a CPU (issue): compiled Q-Sparse step <= 1.05x the compiled dense step, and >= 1.3x
faster than eager Q-Sparse. Measure on a quiet machine.

Usage: ``python bench/bench_compile.py [--steps 20] [--threads 2] [--only dense topk-0.4]``
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

VARIANTS = {
    "dense": dict(mode="none"),
    "topk-0.4": dict(mode="topk", ratio=0.4),
    "block-2:4": dict(mode="block", block="2:4"),
    "bitnet+topk-0.4": dict(mode="topk", ratio=0.4, bitnet=True),
}
SHAPE = dict(num_layers=4, hidden_size=128, num_attention_heads=4, num_query_groups=2,
             seq_length=128, ffn_type="relu2_glu")
VOCAB, BATCH = 4096, 16


def build(variant: str, compiled: bool):
    from megatron_qsparse.config import ModelConfig, QSparseConfig
    from megatron_qsparse.model.gpt import GPTModel
    from megatron_qsparse.parallel.state import ParallelState
    from megatron_qsparse.training.setup import compile_blocks

    torch.manual_seed(0)
    cfg = ModelConfig(**SHAPE).with_sparsity(QSparseConfig(**VARIANTS[variant]))
    model = GPTModel(cfg, VOCAB, parallel=ParallelState.single(), init_seed=0).train()
    if compiled:
        compile_blocks(model)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, foreach=True)
    return model, opt


def time_steps(model, opt, steps: int, warmup: int) -> list[float]:
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, VOCAB, (BATCH, SHAPE["seq_length"] + 1), generator=g)
    times = []
    for i in range(warmup + steps):
        t = time.perf_counter()
        loss = model(tokens[:, :-1], tokens[:, 1:]).mean()
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if i >= warmup:
            times.append(time.perf_counter() - t)
    return times


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[1])
    p.add_argument("--steps", type=int, default=20, help="Timed steps per variant and mode.")
    p.add_argument("--warmup", type=int, default=3, help="Untimed steps first (compilation).")
    p.add_argument("--threads", type=int, default=2, help="torch intra-op threads.")
    p.add_argument("--only", nargs="+", choices=list(VARIANTS), help="Run only these variants.")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    names = args.only or list(VARIANTS)
    if "dense" not in names:
        names = ["dense", *names]
    ms: dict[tuple[str, str], float] = {}
    for name in names:
        for mode in ("eager", "compiled"):
            model, opt = build(name, mode == "compiled")
            ms[(name, mode)] = 1e3 * statistics.median(
                time_steps(model, opt, args.steps, args.warmup))
            print(f"  {name:<16} {mode:<8} {ms[(name, mode)]:8.1f} ms/step", flush=True)
    tokens = BATCH * SHAPE["seq_length"]
    print(f"\ntraining step (forward + backward + AdamW), demo shape, {tokens} tokens, "
          f"{args.threads} threads, torch {torch.__version__}, median of {args.steps}")
    print("| variant | eager ms | compiled ms | speed-up | eager x dense | compiled x dense |")
    print("|---|---:|---:|---:|---:|---:|")
    for name in names:
        e, c = ms[(name, "eager")], ms[(name, "compiled")]
        print(f"| {name} | {e:.1f} | {c:.1f} | {e / c:.2f} | {e / ms[('dense', 'eager')]:.2f} | "
              f"{c / ms[('dense', 'compiled')]:.2f} |")


if __name__ == "__main__":
    main()
