"""Autograd-aware collectives at the edges of the tensor-parallel region (Megatron's mappings).

===================================  ======================  ==========================
function                             forward                 backward
===================================  ======================  ==========================
``copy_to_tensor_parallel``          identity                all-reduce (sum)
``reduce_from_tensor_parallel``      all-reduce (sum)        identity
``scatter_to_tensor_parallel``       keep this rank's chunk  all-gather
``gather_from_tensor_parallel``      all-gather              keep this rank's chunk
===================================  ======================  ==========================

Chunks are along the last dimension. Every function is the identity at TP = 1 (no process group
needed). Plus the plain (no-autograd) helpers the layers use for small agreements:
:func:`all_reduce`, :func:`all_gather_rows`.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from megatron_qsparse.parallel.state import ParallelState


# torch >= 2.13 renamed all_gather_into_tensor (deprecated there) to all_gather_single
_all_gather_single = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor


def all_reduce(t: torch.Tensor, state: ParallelState, op=dist.ReduceOp.SUM) -> torch.Tensor:
    """All-reduce ``t`` in place over the TP group (no-op at TP = 1); returns ``t``."""
    if state.tp_size > 1:
        dist.all_reduce(t, op=op, group=state.tp_group)
    return t


def all_gather_rows(t: torch.Tensor, state: ParallelState) -> torch.Tensor:
    """``[tp, *t.shape]``: ``t`` of every TP rank, stacked in rank order (no autograd)."""
    t = t.contiguous()
    if state.tp_size == 1:
        return t.unsqueeze(0)
    out = torch.empty((state.tp_size * t.shape[0], *t.shape[1:]), dtype=t.dtype, device=t.device)
    _all_gather_single(out, t, group=state.tp_group)
    return out.view(state.tp_size, *t.shape)


def _gather_last(x: torch.Tensor, state: ParallelState) -> torch.Tensor:
    parts = all_gather_rows(x.movedim(-1, 0), state)  # [tp, d_local, ...]
    return torch.cat(list(parts.movedim(1, -1).unbind(0)), dim=-1)


def _split_last(x: torch.Tensor, state: ParallelState) -> torch.Tensor:
    d = x.shape[-1]
    if d % state.tp_size:
        raise ValueError(f"last dimension {d} is not divisible by the tensor-parallel size "
                         f"{state.tp_size}")
    return x.chunk(state.tp_size, dim=-1)[state.tp_rank].contiguous()


class _CopyToRegion(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, state):
        ctx.state = state
        return x

    @staticmethod
    def backward(ctx, grad):
        return all_reduce(grad.clone(memory_format=torch.contiguous_format), ctx.state), None


class _ReduceFromRegion(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, state):
        return all_reduce(x.clone(memory_format=torch.contiguous_format), state)

    @staticmethod
    def backward(ctx, grad):
        return grad, None


class _ScatterToRegion(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, state):
        ctx.state = state
        return _split_last(x, state)

    @staticmethod
    def backward(ctx, grad):
        return _gather_last(grad, ctx.state), None


class _GatherFromRegion(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, state):
        ctx.state = state
        return _gather_last(x, state)

    @staticmethod
    def backward(ctx, grad):
        return _split_last(grad, ctx.state), None


def copy_to_tensor_parallel(x: torch.Tensor, state: ParallelState) -> torch.Tensor:
    """Enter the TP region with a replicated input: identity forward, all-reduce backward."""
    return x if state.tp_size == 1 else _CopyToRegion.apply(x, state)


def reduce_from_tensor_parallel(x: torch.Tensor, state: ParallelState) -> torch.Tensor:
    """Leave the TP region by summing partial results: all-reduce forward, identity backward."""
    return x if state.tp_size == 1 else _ReduceFromRegion.apply(x, state)


def scatter_to_tensor_parallel(x: torch.Tensor, state: ParallelState) -> torch.Tensor:
    """Keep this rank's chunk of the last dim; all-gather the gradient."""
    return x if state.tp_size == 1 else _ScatterToRegion.apply(x, state)


def gather_from_tensor_parallel(x: torch.Tensor, state: ParallelState) -> torch.Tensor:
    """All-gather the last dim (rank order); the gradient keeps this rank's chunk."""
    return x if state.tp_size == 1 else _GatherFromRegion.apply(x, state)


__all__ = ["all_gather_rows", "all_reduce", "copy_to_tensor_parallel",
           "gather_from_tensor_parallel", "reduce_from_tensor_parallel",
           "scatter_to_tensor_parallel"]
