#!/usr/bin/env python
"""Extra communication of the row-parallel global Top-K, against the layer's own all-reduce.

Under tensor parallelism a row-parallel layer (attention ``o``, FFN ``down``) already all-reduces
its ``[tokens, h]`` partial outputs. Its sparsifier adds one all-gather of every rank's Top-K
candidates (``c = min(K, d-K+1, d/tp)`` values per token per rank; see
``megatron_qsparse/parallel/sparsify.py``). For 7B LLaMA shapes (``o``: 4096 -> 4096, ``down``:
11008 -> 4096) on ``--tp`` gloo processes of this machine, in the same run, this prints:

* bytes per token per rank: the candidate all-gather (received from the other ranks), vs the
  output all-reduce (a ring all-reduce moves ``2·(tp-1)/tp·h`` values per rank each way);
* median time of the candidate all-gather, of the whole global Top-K mask (selection, all-gather,
  threshold and ties), and of the output all-reduce (the baseline, ratio 1.00);
* for reference, ``topk_mask`` of the whole unsplit row in one process (what TP = 1 pays).

Usage: ``python bench/bench_tp.py [--tp 2] [--tokens 2048] [--ratios 0.4 0.7] [--repeats 7]``
(``--threads`` per process; the default 1 suits a 2-core machine at TP = 2).
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import time
from datetime import timedelta


import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
import torch.multiprocessing as mp  # noqa: E402

LAYERS = (("o", 4096, 4096), ("down", 11008, 4096))  # (name, input width d, output width h)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _median_ms(fn, repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        dist.barrier()
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    # the slowest rank decides: take the max over ranks of each median
    m = torch.tensor([statistics.median(times)], dtype=torch.float64)
    dist.all_reduce(m, op=dist.ReduceOp.MAX)
    return 1000 * m.item()


def _worker(rank: int, args, port: int, queue) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(args.threads)
    dist.init_process_group("gloo", rank=rank, world_size=args.tp, timeout=timedelta(minutes=5))
    from megatron_qsparse.parallel.mappings import all_gather_rows
    from megatron_qsparse.parallel.sparsify import candidate_count, global_topk_mask
    from megatron_qsparse.parallel.state import ParallelState
    from megatron_qsparse.sparsity import keep_count, topk_mask

    st = ParallelState.build(args.tp)
    t = args.tp
    rows = []
    for ratio in args.ratios:
        for name, d, h in LAYERS:
            torch.manual_seed(rank)
            x = torch.randn(args.tokens, d // t)
            y = torch.randn(args.tokens, h)
            k = keep_count(d, ratio)
            c = candidate_count(d, k, t)
            top = k <= d - k + 1
            cand = x.abs().topk(c, dim=-1, largest=top, sorted=False).values
            gather_ms = _median_ms(lambda: all_gather_rows(cand, st), args.repeats)
            mask_ms = _median_ms(lambda: global_topk_mask(x, k, st), args.repeats)
            reduce_ms = _median_ms(lambda: dist.all_reduce(y.clone(), group=st.tp_group),
                                   args.repeats)
            full = torch.randn(args.tokens, d) if rank == 0 else None
            local_ms = _median_ms((lambda: topk_mask(full, k)) if rank == 0 else (lambda: None),
                                  args.repeats)
            rows.append(dict(layer=name, d=d, h=h, ratio=ratio, k=k, c=c,
                             gather_bytes=(t - 1) * c * 4, reduce_bytes=2 * (t - 1) / t * h * 4,
                             gather_ms=gather_ms, mask_ms=mask_ms, reduce_ms=reduce_ms,
                             local_ms=local_ms))
    if rank == 0:
        queue.put(rows)
    dist.barrier()
    dist.destroy_process_group()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tp", type=int, default=2, help="Tensor-parallel size (processes).")
    p.add_argument("--tokens", type=int, default=2048, help="Tokens per micro-batch.")
    p.add_argument("--ratios", type=float, nargs="+", default=[0.4, 0.7],
                   help="Sparsity ratios S of the row-parallel inputs.")
    p.add_argument("--repeats", type=int, default=7, help="Timed repetitions (median).")
    p.add_argument("--threads", type=int, default=1, help="Torch threads per process.")
    args = p.parse_args()
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    port = _free_port()
    procs = [ctx.Process(target=_worker, args=(r, args, port, queue)) for r in range(args.tp)]
    for proc in procs:
        proc.start()
    rows = queue.get(timeout=1800)
    for proc in procs:
        proc.join()
    print(f"torch {torch.__version__}, gloo on CPU, TP = {args.tp} processes x {args.threads} "
          f"thread(s), fp32, {args.tokens} tokens; bytes per token per rank; times: median ms "
          "(slowest rank)")
    hdr = (f"{'layer':<5} {'d':>6} {'S':>4} {'K':>6} {'cand/rank':>9} | {'B/tok gather':>12} "
           f"{'B/tok allred':>12} {'ratio':>6} | {'ms gather':>9} {'ms mask':>8} "
           f"{'ms allred':>9} {'gather/ar':>9} {'mask/ar':>8} | {'ms TP=1 mask':>12}")
    print(hdr)
    print("-" * len(hdr))
    for r in rows:
        print(f"{r['layer']:<5} {r['d']:>6} {r['ratio']:>4.1f} {r['k']:>6} {r['c']:>9} | "
              f"{r['gather_bytes']:>12,.0f} {r['reduce_bytes']:>12,.0f} "
              f"{r['gather_bytes'] / r['reduce_bytes']:>6.2f} | {r['gather_ms']:>9.2f} "
              f"{r['mask_ms']:>8.2f} {r['reduce_ms']:>9.2f} "
              f"{r['gather_ms'] / r['reduce_ms']:>9.2f} {r['mask_ms'] / r['reduce_ms']:>8.2f} | "
              f"{r['local_ms']:>12.2f}")
    print("B/tok gather: (tp-1)·c·4 bytes received by each rank in the candidate all-gather; "
          "B/tok allred: 2·(tp-1)/tp·h·4 bytes a ring all-reduce of the layer's output sends per "
          "rank. 'ms mask' is the whole global Top-K (local selection + all-gather + threshold + "
          "ties); 'ms TP=1 mask' is topk_mask of the unsplit row in one process. Other row-wide "
          "agreements are small: int8 gamma 4 B/token (all-reduce MAX), L2 rescale 8 B/token, "
          "density 8 B per call while recording, BitNet alpha 8 B per layer.")


if __name__ == "__main__":
    main()
