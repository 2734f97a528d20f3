"""Norms of tensor-parallel parameters for logging: each full tensor counted once."""

from __future__ import annotations

from typing import Iterable

import torch

from megatron_qsparse.parallel.mappings import all_reduce
from megatron_qsparse.parallel.state import ParallelState


def sum_squares_over_tp(values: torch.Tensor, state: ParallelState) -> torch.Tensor:
    """Sum a vector of per-shard squared norms over the TP group (in place; no-op at TP = 1)."""
    return all_reduce(values, state)


def grad_norm(params: Iterable[torch.nn.Parameter], state: ParallelState) -> float:
    """L2 norm of the gradients of the *full* model: TP shards summed over the TP group, replicated
    parameters counted once (on TP rank 0), the stages of a pipeline summed over the PP group, and
    a stage's copy of a tied weight another stage owns (``pipeline_duplicate``) left out. Every
    TP and PP rank must call it; all get the same value (inf or nan if a gradient has one)."""
    sharded, replicated, experts = [], [], {}
    for p in params:
        if p.grad is None or getattr(p, "pipeline_duplicate", False):
            continue
        if getattr(p, "expert_parallel_size", 1) > 1:  # MoE experts differ over the EP group
            experts.setdefault(p.group_name, []).append(p.grad)
            continue
        (sharded if getattr(p, "partition_count", 1) > 1 else replicated).append(p.grad)
    total = torch.zeros(1, dtype=torch.float64)
    for grads, count_here in ((sharded, True), (replicated, state.tp_rank == 0)):
        if grads and count_here:
            norms = torch.stack(torch._foreach_norm(grads)).double()
            total += norms.square().sum().cpu()
    device = (sharded or replicated or [total])[0].device
    total = total.to(device)
    for name, grads in sorted(experts.items()):
        from deepspeed.utils import groups

        sq = torch.stack(torch._foreach_norm(grads)).double().square().sum().reshape(1)
        torch.distributed.all_reduce(sq, group=groups._get_expert_parallel_group(name))
        total += sq.to(device)
    if state.tp_size > 1:
        all_reduce(total, state)
    if state.pp_size > 1:
        torch.distributed.all_reduce(total, group=state.pp_group)
    return float(total.sqrt())
