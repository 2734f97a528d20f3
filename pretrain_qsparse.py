#!/usr/bin/env python
"""Pretrain (or continue-train) a Q-Sparse LLaMA-style model.

Runs as a plain ``python pretrain_qsparse.py ...`` (one process) or under the ``deepspeed``
launcher (``deepspeed --num_gpus N pretrain_qsparse.py ...``). See ``--help`` for every flag.
"""

from __future__ import annotations

import json
import os
import sys

from megatron_qsparse.arguments import parse
from megatron_qsparse.config import ConfigError


def format_summary(summary: dict) -> str:
    def fmt(v, spec):
        return format(v, spec) if v is not None else "n/a"

    density = summary.get("density") or {}
    lines = ["", "=" * 64, "run summary",
             f"  iterations          {summary['iterations']}",
             f"  first train loss    {fmt(summary.get('first_loss'), '.4f')}",
             f"  final train loss    {fmt(summary.get('train_loss'), '.4f')}",
             f"  final valid loss    {fmt(summary.get('valid_loss'), '.4f')}",
             *([f"  test loss           {summary['test_loss']:.4f}"]
               if summary.get("test_loss") is not None else []),
             f"  throughput          {fmt(summary.get('tokens_per_sec'), ',.0f')} tokens/s"]
    if density:
        lines.append("  measured density    " + "  ".join(
            f"{k.split('/', 1)[1]} {v:.3f}" for k, v in density.items()))
        mean = sum(density.values()) / len(density)
        lines.append(f"  mean sparsity       {1 - mean:.1%} of linear inputs zeroed")
    if summary.get("skipped_iterations"):
        lines.append(f"  skipped iterations  {summary['skipped_iterations']} (non-finite gradients)")
    if summary.get("exit_reason", "finished") != "finished":
        lines.append(f"  stopped early       {summary['exit_reason']}")
    lines.append("=" * 64)
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    cfg = parse(argv)
    # Imported after parsing so that --help and flag errors answer instantly.
    from megatron_qsparse.training.checkpointing import atomic_write_text, check_save_dir, load
    from megatron_qsparse.training.logging import setup_logging
    from megatron_qsparse.training.setup import setup
    from megatron_qsparse.training.trainer import Trainer, TrainingStopped
    from megatron_qsparse.training.watchdog import start as watch_launcher

    watch_launcher()  # under the deepspeed launcher: stop when it is killed
    try:
        setup_logging(int(os.environ.get("RANK", 0)))
        if cfg.train.save:  # before building anything, not at the first save
            check_save_dir(cfg.train.save)
        state = setup(cfg)
        setup_logging(state.rank)
        if cfg.train.load:
            state.iteration, state.consumed_samples = load(state.engine, cfg, state.dp_size)
        summary = Trainer(state).train()
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except TrainingStopped as e:
        print(f"error: training stopped: {e}", file=sys.stderr)
        return 1
    if state.rank == 0:
        print(format_summary(summary), flush=True)
        if cfg.log.summary_json:
            atomic_write_text(cfg.log.summary_json, json.dumps(summary, indent=1))
    shutdown()
    return 0


def shutdown() -> None:
    """Leave the process group cleanly: every rank waits for the others, then tears down its
    communication threads before the interpreter exits (avoids aborts at exit under gloo)."""
    import torch

    if torch.distributed.is_initialized():
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())
