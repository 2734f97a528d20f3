#!/usr/bin/env python
"""Training throughput of the demo-shaped model under each TP x PP x DP layout, and the pipeline
bubble, expected vs measured.

Every layout trains the same model (``examples/configs/demo_tiny.yaml``'s shape: 4 blocks, width
128, GQA 4/2, relu2 GLU, top-K S = 0.5, sequences of 128) on the sample corpus with the same
global batch (``--global-batch-size`` sequences of ``--micro-batch-size``; a data-parallel rank
accumulates ``global / (micro x DP)`` micro-batches, which are also the pipeline's micro-batches),
launched with ``deepspeed --num_gpus N`` on this machine's CPU cores (``cores / N`` threads per
process, at least 1: 4 processes on 2 cores oversubscribe). It prints, per layout:

* tokens/s over the timed iterations (the first iteration is left out) and the ratio against
  the one-process run of the same invocation (the baseline, 1.00);
* for PP > 1, the bubble of DeepSpeed's 1F1B schedule: expected ``(p-1)/(m+p-1)`` for ``p``
  stages and ``m`` micro-batches, and measured ``1 - busy/iteration`` where ``busy`` is the time a
  stage spends in its forward passes, backward passes and optimizer step (so waiting on the
  other stage, and on this machine the gloo transfers, count as bubble); mean over stages.

Usage: ``python bench/bench_parallel.py [--layouts 1,1,1 1,2,1 ...] [--iters 8]``
(``--worker`` is the per-rank entry the launcher runs; not for direct use).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

LAYOUTS = ("1,1,1", "1,1,2", "2,1,1", "1,2,1", "2,2,1", "1,2,2")
MODEL = ["--config", os.path.join(ROOT, "examples", "configs", "demo_tiny.yaml")]


def _worker(argv: list[str]) -> None:
    """One rank: train ``--train-iters`` steps, time the pipeline's busy parts, rank 0 writes
    the result JSON."""
    result_path = argv[argv.index("--result") + 1]
    del argv[argv.index("--result"):argv.index("--result") + 2]
    import torch

    from megatron_qsparse.arguments import parse
    from megatron_qsparse.training.setup import setup
    from megatron_qsparse.training.trainer import Trainer

    threads = int(os.environ.get("BENCH_THREADS", "1"))
    torch.set_num_threads(threads)
    busy, batches = [0.0], []
    from deepspeed.runtime.pipe.engine import PipelineEngine

    def timed(fn):
        def wrapper(self, *a, **k):
            t = time.perf_counter()
            try:
                return fn(self, *a, **k)
            finally:
                busy[0] += time.perf_counter() - t
        return wrapper

    from deepspeed.runtime.pipe import schedule

    # the engine dispatches through this class-level map of plain functions
    busy_kinds = (schedule.ForwardPass, schedule.BackwardPass, schedule.OptimizerStep,
                  schedule.ReduceGrads, schedule.ReduceTiedGrads, schedule.LoadMicroBatch)
    for kind in busy_kinds:
        PipelineEngine._INSTRUCTION_MAP[kind] = timed(PipelineEngine._INSTRUCTION_MAP[kind])
    train_batch = PipelineEngine.train_batch

    def train_batch_timed(self, *a, **k):
        busy[0] = 0.0
        t = time.perf_counter()
        out = train_batch(self, *a, **k)
        batches.append((time.perf_counter() - t, busy[0]))
        return out

    PipelineEngine.train_batch = train_batch_timed

    cfg = parse(argv)
    state = setup(cfg)
    summary = Trainer(state).train()
    timed_batches = batches[1:]  # the first pays one-off costs
    bubble = None
    if timed_batches:
        bubble = 1.0 - sum(b for _, b in timed_batches) / sum(t for t, _ in timed_batches)
    gathered = [None] * state.world_size
    torch.distributed.all_gather_object(gathered, {"pp_rank": state.parallel.pp_rank,
                                                   "bubble": bubble})
    if state.rank == 0:
        stages = {}
        for g in gathered:
            if g["bubble"] is not None:
                stages.setdefault(g["pp_rank"], []).append(g["bubble"])
        measured = (sum(sum(v) / len(v) for v in stages.values()) / len(stages)
                    if stages else None)
        with open(result_path, "w") as fh:
            json.dump({"tokens_per_sec": summary["tokens_per_sec"], "bubble": measured,
                       "loss": summary["train_loss"]}, fh)
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()


def _data(work: str, python: str) -> str:
    prefix = os.path.join(work, "kjv")
    subprocess.run([python, os.path.join(ROOT, "tools", "preprocess_data.py"), "--input",
                    os.path.join(ROOT, "examples", "data", "kjv_sample.jsonl"), "--output-prefix",
                    prefix, "--tokenizer-type", "SentencePieceTokenizer", "--tokenizer-model",
                    os.path.join(ROOT, "examples", "data", "kjv_sp4k.model"), "--append-eod",
                    "--workers", "1"], check=True, capture_output=True)
    return prefix + "_text_document"


def main() -> None:
    if "--worker" in sys.argv:
        argv = [a for a in sys.argv[1:] if a != "--worker" and not a.startswith("--local_rank")]
        _worker(argv)
        return
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--layouts", nargs="+", default=list(LAYOUTS),
                    help="TP,PP,DP triples; the first is the baseline (default: %(default)s)")
    ap.add_argument("--iters", type=int, default=8, help="training iterations per layout")
    ap.add_argument("--global-batch-size", type=int, default=16)
    ap.add_argument("--micro-batch-size", type=int, default=2)
    ap.add_argument("--zero-stage", type=int, default=1, help="ZeRO stage of every layout")
    ap.add_argument("--threads", type=int, default=None,
                    help="torch threads per process (default: cores / processes, at least 1)")
    args = ap.parse_args()
    python = sys.executable
    launcher = shutil.which("deepspeed") or os.path.join(os.path.dirname(python), "deepspeed")
    cores = os.cpu_count() or 1
    work = tempfile.mkdtemp(prefix="bench_parallel_")
    try:
        data = _data(work, python)
        rows = []
        for i, layout in enumerate(args.layouts):
            tp, pp, dp = (int(v) for v in layout.split(","))
            n = tp * pp * dp
            m = args.global_batch_size // (args.micro_batch_size * dp)
            result = os.path.join(work, f"result{i}.json")
            env = {k: v for k, v in os.environ.items()
                   if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
            threads = args.threads or max(1, cores // n)
            env.update(DS_ACCELERATOR="cpu", BENCH_THREADS=str(threads),
                       OMP_NUM_THREADS=str(threads), PYTHONPATH=ROOT)
            cmd = [launcher, "--num_gpus", str(n), "--master_port", str(29400 + i),
                   os.path.abspath(__file__), "--worker", "--result", result, *MODEL,
                   "--data-path", data, "--tokenizer-model",
                   os.path.join(ROOT, "examples", "data", "kjv_sp4k.model"),
                   "--train-iters", str(args.iters), "--lr-warmup-iters", "0", "--eval-iters", "0",
                   "--log-interval", str(args.iters), "--micro-batch-size",
                   str(args.micro_batch_size), "--global-batch-size",
                   str(args.global_batch_size), "--tensor-model-parallel-size", str(tp),
                   "--pipeline-model-parallel-size", str(pp), "--zero-stage",
                   str(args.zero_stage), "--tensorboard-dir", os.path.join(work, f"tb{i}")]
            proc = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=ROOT)
            if proc.returncode != 0:
                print(proc.stdout[-2000:] + proc.stderr[-2000:], file=sys.stderr)
                raise SystemExit(f"layout {layout} failed")
            with open(result) as fh:
                r = json.load(fh)
            expected = (pp - 1) / (m + pp - 1) if pp > 1 else None
            rows.append((tp, pp, dp, n, threads, m, r["tokens_per_sec"], expected, r["bubble"]))
            print(f"  done {layout}: {r['tokens_per_sec']:,.0f} tokens/s", file=sys.stderr)
    finally:
        shutil.rmtree(work, ignore_errors=True)

    base = rows[0][6]
    print(f"\nTraining throughput per layout ({cores} CPU cores, ZeRO-{args.zero_stage}, global "
          f"batch {args.global_batch_size} x 128 tokens, micro-batch {args.micro_batch_size})")
    print(f"{'TP':>3} {'PP':>3} {'DP':>3} {'procs':>5} {'thr/proc':>8} {'micro-b':>7} "
          f"{'tokens/s':>10} {'ratio':>6} {'bubble exp':>10} {'bubble meas':>11}")
    for tp, pp, dp, n, threads, m, tps, exp, meas in rows:
        e = f"{exp:.3f}" if exp is not None else "-"
        b = f"{meas:.3f}" if meas is not None else "-"
        print(f"{tp:>3} {pp:>3} {dp:>3} {n:>5} {threads:>8} {m:>7} {tps:>10,.0f} "
              f"{tps / base:>6.2f} {e:>10} {b:>11}")


if __name__ == "__main__":
    main()
