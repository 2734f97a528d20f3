#!/usr/bin/env python
"""Packed vs padded SFT: trained tokens per second of the same instruction set, same run.

A generated instruction set with a realistic length spread (OpenOrca-like, scaled to the
sequence length: prompt and response lengths lognormal, prompt median ``seq/10``, response
median ``seq/8``, sigma 0.8 and 0.9, so most samples fill a fraction of a sequence and a few are
truncated) is written as ``PREFIX_sft``/``PREFIX_sft_mask`` indexed datasets and read by the
training path's own pieces: :class:`~megatron_qsparse.data.sft_dataset.SFTDataset` (one sample
per sequence, padded) or :class:`~megatron_qsparse.data.sft_packing.PackedSFTDataset`
(``--sft-packing``), ``collate_tokens``, ``get_batch``/``document_inputs``, the GPT model (the demo
shape: 4 blocks, width 128, GQA 4/2, relu2_glu, top-K S = 0.4, vocabulary 4096), ``mean_loss``,
backward and AdamW. Each step is one micro-batch of ``--micro-batch`` sequences; the two modes'
steps alternate (each with its own model), timed after warm-up. Reported per mode (from the
median step time):

* ``trained tok/s``: response tokens (label != -100) per second: the measure of useful work;
* ``non-pad tok/s``: sample tokens (prompts included) per second;
* ``fill``: sample tokens / sequence positions; ``samples/step``;
* ``x padded``: trained tokens per second relative to padded (the packing gain).

Usage: ``python bench/bench_packing.py [--seq-length 256] [--steps 20] [--threads 2]``
(``--quick``: a short check run).
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time

import numpy as np
import torch

VOCAB, BOS, EOD, PAD = 4096, 1, 2, 3
SHAPE = dict(num_layers=4, hidden_size=128, num_attention_heads=4, num_query_groups=2,
             ffn_type="relu2_glu")


def write_instructions(prefix: str, n: int, seq_length: int, seed: int = 0) -> dict:
    """``n`` samples ``[bos] prompt | response eod`` with lognormal lengths; returns stats."""
    from megatron_qsparse.data.indexed_dataset import IndexedDatasetBuilder
    from megatron_qsparse.data.sft_dataset import MASK_SUFFIX

    rng = np.random.default_rng(seed)
    prompts = np.maximum(1, rng.lognormal(np.log(seq_length / 10), 0.8, n)).astype(int)
    responses = np.maximum(1, rng.lognormal(np.log(seq_length / 8), 0.9, n)).astype(int)
    with IndexedDatasetBuilder(prefix, np.uint16) as tb, \
            IndexedDatasetBuilder(prefix + MASK_SUFFIX, np.uint8) as mb:
        for p, r in zip(prompts.tolist(), responses.tolist()):
            tb.add_document(np.concatenate([[BOS], rng.integers(4, VOCAB, p + r), [EOD]]))
            mb.add_document(np.array([0] * (1 + p) + [1] * (r + 1)))
    total = prompts + responses + 2
    return {"samples": n, "mean_len": float(total.mean()), "median_len": float(np.median(total)),
            "p95_len": float(np.percentile(total, 95)),
            "truncated": int((total > seq_length + 1).sum())}


def build_model():
    from megatron_qsparse.config import ModelConfig, QSparseConfig
    from megatron_qsparse.model.gpt import GPTModel
    from megatron_qsparse.parallel.state import ParallelState

    torch.manual_seed(0)
    cfg = ModelConfig(seq_length=ARGS.seq_length, **SHAPE).with_sparsity(
        QSparseConfig(mode="topk", ratio=0.4))
    model = GPTModel(cfg, VOCAB, parallel=ParallelState.single(), init_seed=0).train()
    return model, torch.optim.AdamW(model.parameters(), lr=1e-4, foreach=True)


def _step(model, opt, dataset, step: int, batch: int) -> tuple[float, dict]:
    from megatron_qsparse.data.sampler import collate_tokens
    from megatron_qsparse.model.gpt import mean_loss
    from megatron_qsparse.training.loop import document_inputs, get_batch

    items = [dataset[(step * batch + i) % len(dataset)] for i in range(batch)]
    t = time.perf_counter()
    b = collate_tokens(items)
    tokens, labels = get_batch(b)
    loss = mean_loss(model(tokens, labels, **document_inputs(b)), labels)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    elapsed = time.perf_counter() - t
    pad = b["tokens"][:, 1:] == PAD
    packed = hasattr(dataset, "sample_documents")
    return elapsed, {"trained": int((labels != -100).sum()), "nonpad": int((~pad).sum()),
                     "positions": pad.numel(),
                     "samples": sum(len(dataset.sample_documents((step * batch + i) %
                                                                 len(dataset)))
                                    if packed else 1 for i in range(batch))}


def run(datasets: dict, steps: int, warmup: int, batch: int) -> dict:
    """Steps of every mode interleaved (a busy machine slows them alike), each mode with its own
    model and optimizer from the same initialisation; per mode the median step time and the
    mean counts per step."""
    runs = {name: (*build_model(), ds) for name, ds in datasets.items()}
    times = {name: [] for name in datasets}
    counts = {name: {} for name in datasets}
    for step in range(warmup + steps):
        names = list(runs) if step % 2 == 0 else list(runs)[::-1]
        for name in names:
            elapsed, c = _step(*runs[name], step, batch)
            if step >= warmup:
                times[name].append(elapsed)
                for k, v in c.items():
                    counts[name][k] = counts[name].get(k, 0) + v
    out = {}
    for name in runs:
        t, c = statistics.median(times[name]), counts[name]
        out[name] = {"trained_tok_s": c["trained"] / steps / t,
                     "nonpad_tok_s": c["nonpad"] / steps / t,
                     "fill": c["nonpad"] / c["positions"], "samples_per_step": c["samples"] / steps,
                     "step_ms": 1000 * t}
    return out


def main() -> None:
    from megatron_qsparse.data.indexed_dataset import IndexedDataset
    from megatron_qsparse.data.sft_dataset import MASK_SUFFIX, SFTDataset
    from megatron_qsparse.data.sft_packing import PackedSFTDataset

    torch.set_num_threads(ARGS.threads)
    n_seq = (ARGS.steps + ARGS.warmup) * ARGS.micro_batch
    with tempfile.TemporaryDirectory() as d:
        prefix = os.path.join(d, "bench_sft")
        stats = write_instructions(prefix, ARGS.samples, ARGS.seq_length)
        toks, mask = IndexedDataset(prefix), IndexedDataset(prefix + MASK_SUFFIX)
        docs = np.arange(len(toks))
        padded = SFTDataset(toks, mask, docs, n_seq, ARGS.seq_length, 0, PAD)
        t = time.perf_counter()
        packed = PackedSFTDataset(toks, mask, docs, n_seq, ARGS.seq_length, 0, PAD,
                                  cache_dir=d)
        pack_s = time.perf_counter() - t
        print(f"instruction set: {stats['samples']} samples, length mean {stats['mean_len']:.0f} "
              f"/ median {stats['median_len']:.0f} / p95 {stats['p95_len']:.0f} tokens, "
              f"{stats['truncated']} longer than --seq-length {ARGS.seq_length} + 1; packed "
              f"into {packed.sequences_per_epoch} sequences per epoch ({100 * packed.fill:.1f}% "
              f"filled) in {pack_s:.2f} s")
        print(f"model: {SHAPE}, top-K 0.4, vocabulary {VOCAB}; micro-batch {ARGS.micro_batch} x "
              f"{ARGS.seq_length}; {ARGS.steps} timed steps after {ARGS.warmup}; "
              f"{ARGS.threads} threads")
        results = run({"padded": padded, "packed": packed}, ARGS.steps, ARGS.warmup,
                      ARGS.micro_batch)
    base = results["padded"]["trained_tok_s"]
    print("\n| mode | trained tok/s | non-pad tok/s | fill | samples/step | step ms | x padded |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for name, r in results.items():
        print(f"| {name} | {r['trained_tok_s']:.0f} | {r['nonpad_tok_s']:.0f} | "
              f"{100 * r['fill']:.1f}% | {r['samples_per_step']:.1f} | {r['step_ms']:.0f} | "
              f"{r['trained_tok_s'] / base:.2f}x |")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seq-length", type=int, default=256)
    parser.add_argument("--micro-batch", type=int, default=8)
    parser.add_argument("--samples", type=int, default=20000)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--quick", action="store_true", help="a short check run")
    ARGS = parser.parse_args()
    if ARGS.quick:
        ARGS.samples, ARGS.steps, ARGS.warmup, ARGS.seq_length = 2000, 4, 1, 128
    main()
