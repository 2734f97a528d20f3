"""Cross entropy over vocab-parallel logits (Megatron's), without gathering the vocabulary.

Each TP rank holds logits for its vocabulary slice ``[r·V/tp, (r+1)·V/tp)``. Per token:
the row max (all-reduce MAX), the target logit (the rank owning the label contributes it:
all-reduce SUM) and ``Σ exp`` (all-reduce SUM) give ``loss = log Σ exp(z - max) - (z_y - max)``.
The gradient ``softmax - onehot(y)`` is formed locally. Label ``ignore_index`` (-100) gives a loss
and a gradient of 0, as ``F.cross_entropy(..., reduction="none")`` does.

At TP = 1 this is ``F.cross_entropy`` itself.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F

from megatron_qsparse.parallel.mappings import all_reduce
from megatron_qsparse.parallel.state import ParallelState

IGNORE_INDEX = -100


class _VocabParallelCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, labels, state):
        v_local = logits.shape[-1]
        start = state.tp_rank * v_local
        ctx.dtype = logits.dtype
        logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
        row_max = logits.max(dim=-1, keepdim=True).values
        all_reduce(row_max, state, op=dist.ReduceOp.MAX)
        shifted = logits - row_max
        ignored = labels == IGNORE_INDEX
        mine = (labels >= start) & (labels < start + v_local) & ~ignored
        local_label = (labels - start).masked_fill(~mine, 0)
        target = shifted.gather(-1, local_label.unsqueeze(-1)).squeeze(-1).masked_fill(~mine, 0.0)
        exp = shifted.exp_()
        sum_exp = exp.sum(-1)
        both = torch.stack([target, sum_exp])
        all_reduce(both, state)
        target, sum_exp = both.unbind(0)
        loss = (sum_exp.log() - target).masked_fill(ignored, 0.0)
        exp.div_(sum_exp.unsqueeze(-1))  # softmax
        ctx.save_for_backward(exp, local_label, mine, ignored)
        return loss

    @staticmethod
    def backward(ctx, grad):
        softmax, local_label, mine, ignored = ctx.saved_tensors
        g = softmax.clone()
        onehot = torch.zeros_like(g).scatter_(-1, local_label.unsqueeze(-1),
                                              mine.unsqueeze(-1).to(g.dtype))
        g.sub_(onehot).mul_(grad.masked_fill(ignored, 0.0).unsqueeze(-1))
        return g.to(ctx.dtype), None, None


def vocab_parallel_cross_entropy(logits: torch.Tensor, labels: torch.Tensor,
                                 state: ParallelState) -> torch.Tensor:
    """Per-token loss ``[...]`` (in fp32, or fp64 for fp64 logits) from this rank's logits
    ``[..., V/tp]`` and the full-vocabulary ``labels [...]`` (the same on every TP rank)."""
    if state.tp_size == 1:
        logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
        return F.cross_entropy(logits.flatten(0, -2), labels.flatten(),
                               reduction="none", ignore_index=IGNORE_INDEX).view(labels.shape)
    return _VocabParallelCrossEntropy.apply(logits, labels, state)


__all__ = ["IGNORE_INDEX", "vocab_parallel_cross_entropy"]
