#!/usr/bin/env python
"""The GPU check's measurements (run by bench/gpu_check.sh on one H100/H200-class GPU).

Prints one table per part, each with the ratio against its baseline measured in the same run:

1. sparsifier cost at 7B shapes, bf16, 4096 tokens: our Triton Top-K (``qsparse::topk_sparsify``,
   S = 0.4) and the ``torch.topk`` + scatter path, against the matmul the projection feeds
   (target: sparsifier <= 3% of its matmul);
2. training step on the 1B recipe's shape (examples/pretrain_1b.sh: 22 x 2048, GQA 32/4, FFN
   5632, relu2_glu, sequence 2048), bf16, every block compiled as ``--torch-compile`` does,
   AdamW: dense vs Q-Sparse top-K S = 0.4 — tokens/s and MFU (dense FLOPs / peak; activated
   FLOPs / peak for Q-Sparse). Targets: Q-Sparse step <= 1.05x dense, dense MFU >= 40%;
3. decode GEMV (batch 1, bf16 weights [11008 -> 4096], 7B's down projection): Triton fused Top-K
   GEMV vs the dense ``torch.mv``, speed-up / ideal 1/(1-S) at S = 0.4-0.7;
4. Block 2:4 activations on sparse tensor cores (``inference/semi_structured.py``) vs the dense
   GEMM, fp16, 4096 tokens x [4096 -> 11008].

``--smoke`` runs every part at tiny shapes on whatever device there is (CPU: Triton through its
interpreter), to check the script itself; its numbers mean nothing.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch

PEAK_BF16 = {"H100": 989e12, "H200": 989e12, "A100": 312e12}  # dense bf16 spec, FLOP/s


def timer(fn, reps: int, warmup: int = 3) -> float:
    """Median seconds of ``fn()`` (CUDA events on a GPU)."""
    for _ in range(warmup):
        fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
        out = []
        for _ in range(reps):
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            fn()
            b.record()
            b.synchronize()
            out.append(a.elapsed_time(b) / 1e3)
        return statistics.median(out)
    out = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t)
    return statistics.median(out)


def part_sparsifier(dev, smoke: bool) -> None:
    from megatron_qsparse.sparsity import keep_count
    from megatron_qsparse.sparsity.ops import topk_sparsify_op

    tokens = 64 if smoke else 4096
    shapes = {"qkv 4096->12288": (4096, 12288), "gate_up 4096->22016": (4096, 22016),
              "o 4096->4096": (4096, 4096), "down 11008->4096": (11008, 4096)}
    if smoke:
        shapes = {"tiny 256->512": (256, 512)}
    dt = torch.bfloat16
    print(f"\n1. sparsifier vs its matmul, bf16, {tokens} tokens, S = 0.4 (ms)")
    print("| projection | matmul | Triton Top-K | x matmul | torch.topk path | x matmul |")
    print("|---|---:|---:|---:|---:|---:|")
    for name, (d, n) in shapes.items():
        x = torch.randn(tokens, d, device=dev, dtype=dt)
        w = torch.randn(n, d, device=dev, dtype=dt) * 0.02
        k = keep_count(d, 0.4)
        kt = torch.tensor(k, device=dev)
        reps = 3 if smoke else 50
        mm = timer(lambda: x @ w.t(), reps)
        ours = timer(lambda: topk_sparsify_op(x, kt, False), reps)

        def torch_path():
            idx = x.abs().topk(k, dim=-1, sorted=False).indices
            return x * torch.zeros_like(x, dtype=torch.bool).scatter_(-1, idx, True)

        ref = timer(torch_path, reps)
        print(f"| {name} | {mm * 1e3:.3f} | {ours * 1e3:.3f} | {ours / mm:.1%} | "
              f"{ref * 1e3:.3f} | {ref / mm:.1%} |", flush=True)


def part_training(dev, smoke: bool) -> None:
    from megatron_qsparse.config import ModelConfig, QSparseConfig
    from megatron_qsparse.model.accounting import flops_per_token
    from megatron_qsparse.model.gpt import GPTModel
    from megatron_qsparse.parallel.state import ParallelState
    from megatron_qsparse.sparsity import collect_density, reset_density
    from megatron_qsparse.training.setup import compile_blocks

    if smoke:
        shape = dict(num_layers=2, hidden_size=64, num_attention_heads=4, num_query_groups=2,
                     ffn_hidden_size=128, seq_length=64, ffn_type="relu2_glu")
        vocab, mbs, steps = 512, 2, 2
    else:
        shape = dict(num_layers=22, hidden_size=2048, num_attention_heads=32, num_query_groups=4,
                     ffn_hidden_size=5632, seq_length=2048, ffn_type="relu2_glu")
        vocab, mbs, steps = 32000, 4, 20
    name = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    peak = next((v for k, v in PEAK_BF16.items() if k in name), None)
    seq = shape["seq_length"]
    print(f"\n2. training step, {shape['num_layers']} x {shape['hidden_size']}, {mbs} x {seq} "
          f"tokens, bf16, compiled blocks, AdamW ({name}; peak "
          f"{'n/a' if peak is None else f'{peak / 1e12:.0f} TFLOP/s'})")
    print("| model | ms/step | tokens/s | x dense | MFU (dense FLOPs) | MFU (activated) |")
    print("|---|---:|---:|---:|---:|---:|")
    dense_ms = None
    for label, q in (("dense", QSparseConfig(mode="none")),
                     ("Q-Sparse top-K 0.4", QSparseConfig(mode="topk", ratio=0.4))):
        torch.manual_seed(0)
        cfg = ModelConfig(**shape).with_sparsity(q)
        model = GPTModel(cfg, vocab, parallel=ParallelState.single()).to(dev, torch.bfloat16)
        compile_blocks(model)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4, foreach=True)
        tok = torch.randint(0, vocab, (mbs, seq + 1), device=dev)

        def step():
            loss = model(tok[:, :-1], tok[:, 1:]).float().mean()
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)

        reset_density(model)
        sec = timer(step, steps, warmup=3)
        density = collect_density(model)
        dense_f = flops_per_token(cfg, vocab, seq)
        act_f = flops_per_token(cfg, vocab, seq, density or None)
        tps = mbs * seq / sec
        dense_ms = dense_ms or sec
        mfu = lambda f: "n/a" if peak is None else f"{tps * f / peak:.1%}"  # noqa: E731
        print(f"| {label} | {sec * 1e3:.1f} | {tps:,.0f} | {sec / dense_ms:.2f} | {mfu(dense_f)} | "
              f"{mfu(act_f)} |", flush=True)
        del model, opt
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


def part_decode(dev, smoke: bool) -> None:
    from megatron_qsparse.inference import triton_kernels as tk
    from megatron_qsparse.sparsity import keep_count

    d, n = (256, 128) if smoke else (11008, 4096)
    wt = (torch.randn(d, n, device=dev) * 0.02).to(torch.bfloat16)  # input-major
    w = wt.t().contiguous()
    x = torch.randn(d, device=dev, dtype=torch.bfloat16)
    reps = 3 if smoke else 200
    dense = timer(lambda: torch.mv(w, x), reps)
    print(f"\n3. decode GEMV, batch 1, bf16 weights [{d} -> {n}] (us); dense torch.mv "
          f"{dense * 1e6:.1f} us, {2 * d * n / dense / 1e9:.0f} GB/s")
    print("| S | fused Top-K GEMV | speed-up | ideal | speed-up / ideal |")
    print("|---:|---:|---:|---:|---:|")
    for s in (0.4, 0.5, 0.6, 0.7):
        k = keep_count(d, s)
        t = timer(lambda: tk.gemv_topk(x, wt, k), reps)
        ideal = d / k
        print(f"| {s} | {t * 1e6:.1f} | {dense / t:.2f} | {ideal:.2f} | {dense / t / ideal:.2f} |",
              flush=True)


def part_semi_structured(dev, smoke: bool) -> None:
    import torch.nn.functional as F

    from megatron_qsparse.inference import semi_structured as ss
    from megatron_qsparse.sparsity import block_mask

    reason = ss.unavailable_reason()
    print("\n4. Block 2:4 activations on sparse tensor cores")
    if reason:
        print(f"   not available here: {reason}")
        return
    t_, d, n = (64, 256, 512) if smoke else (4096, 4096, 11008)
    x = torch.randn(t_, d, device=dev, dtype=torch.float16)
    xs = x * block_mask(x, 2, 4)
    w = torch.randn(n, d, device=dev, dtype=torch.float16) * 0.02
    reps = 3 if smoke else 50
    dense = timer(lambda: F.linear(xs, w), reps)
    sparse = timer(lambda: ss.block24_linear(xs, w), reps)
    print(f"| GEMM {t_} x [{d} -> {n}] fp16 | dense {dense * 1e3:.3f} ms | 2:4 "
          f"{sparse * 1e3:.3f} ms | speed-up {dense / sparse:.2f} |")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--smoke", action="store_true", help="Tiny shapes on any device.")
    p.add_argument("--parts", nargs="+", default=["1", "2", "3", "4"],
                   choices=["1", "2", "3", "4"], help="Which parts to run.")
    args = p.parse_args()
    if not torch.cuda.is_available() and not args.smoke:
        raise SystemExit("gpu_check: no CUDA device; run with --smoke to check the script on CPU")
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    print(f"torch {torch.__version__}, device "
          f"{torch.cuda.get_device_name() if dev.type == 'cuda' else 'cpu'}, "
          f"TRITON_INTERPRET={os.environ.get('TRITON_INTERPRET', '0')}")
    parts = {"1": part_sparsifier, "2": part_training, "3": part_decode,
             "4": part_semi_structured}
    for key in args.parts:
        try:
            parts[key](dev, args.smoke)
        except Exception as e:  # one failing part must not hide the others' numbers
            print(f"\npart {key} failed: {type(e).__name__}: {str(e).splitlines()[0][:300]}")


if __name__ == "__main__":
    main()
