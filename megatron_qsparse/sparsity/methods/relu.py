"""ReLU (``--qsparse-mode relu``, the paper's ablation): ``max(x, 0)`` instead of Top-K, with its
natural gradient; the sparsity is whatever it gives. Elementwise: nothing to agree under TP."""

from __future__ import annotations

import torch.nn.functional as F

from megatron_qsparse.sparsity.methods.base import SparsityMethod, register


@register
class ReLU(SparsityMethod):
    name = "relu"
    help = "ReLU (ablation)"

    @classmethod
    def describe(cls, q) -> str:
        return "relu" + (" int8" if q.quantize_activations else "")

    def decode_step_op(self, sp, d):
        return {"op": "relu"}

    def sparsify(self, x, sp, stats):
        y = F.relu(x)
        if stats is not None:
            stats.record(y)
        return y
