"""The sparsifier of a row-parallel input, whose features are split across the TP ranks.

Each rank holds a contiguous slice ``[r·d/t, (r+1)·d/t)`` of every token's ``d`` features. The
result must be what :class:`~megatron_qsparse.sparsity.Sparsifier` gives on the whole row, element
for element. What a method agrees across the ranks (the Top-K threshold, int8 ``γ``, L2 norms,
the density count) is the method's own business (``sparsity/methods/``); this module only hands it
the tensor-parallel group as a :class:`~megatron_qsparse.sparsity.methods.RowSlices`.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from megatron_qsparse.parallel.mappings import all_gather_rows, all_reduce
from megatron_qsparse.parallel.state import ParallelState
from megatron_qsparse.sparsity import Sparsifier, quantize_int8_sharded as _quantize_rows
from megatron_qsparse.sparsity.methods.topk import candidate_count
from megatron_qsparse.sparsity.methods.topk import global_topk_mask as _global_topk_mask

_OPS = {"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX}


class TensorParallelRow:
    """The TP group of ``state`` as a :class:`~megatron_qsparse.sparsity.methods.RowSlices`."""

    def __init__(self, state: ParallelState):
        self.state, self.size, self.rank = state, state.tp_size, state.tp_rank

    def all_reduce(self, t: torch.Tensor, op: str = "sum") -> None:
        all_reduce(t, self.state, op=_OPS[op])

    def all_gather(self, t: torch.Tensor) -> torch.Tensor:
        return all_gather_rows(t, self.state)


def global_topk_mask(x: torch.Tensor, k: int, state: ParallelState) -> torch.Tensor:
    """This rank's slice of ``topk_mask(full_x, k)`` (see ``sparsity/methods/topk.py``)."""
    return _global_topk_mask(x, k, TensorParallelRow(state))


def quantize_int8_sharded(x: torch.Tensor, state: ParallelState, eps: float = 1e-5
                          ) -> torch.Tensor:
    """``quantize_int8`` of the whole row on this rank's slice (``γ`` agreed by all-reduce MAX)."""
    return _quantize_rows(x, TensorParallelRow(state), eps)


def sparsify_sharded(sp: Sparsifier, x: torch.Tensor, state: ParallelState) -> torch.Tensor:
    """``sp(full_x)`` restricted to this rank's slice ``x``; at TP = 1 exactly ``sp(x)``."""
    if state.tp_size == 1:
        return sp(x)
    return sp.forward_sharded(x, TensorParallelRow(state))


__all__ = ["TensorParallelRow", "candidate_count", "global_topk_mask", "quantize_int8_sharded",
           "sparsify_sharded"]
