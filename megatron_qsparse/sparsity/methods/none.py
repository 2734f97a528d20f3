"""No sparsifier (``--qsparse-mode none``): the dense baseline. The input passes unchanged; its
natural density is still recorded, so a dense run logs the same statistics (e.g. the zeros ReLU²
leaves before ``down``). Decoding reads every nonzero input's weights."""

from __future__ import annotations

from megatron_qsparse.sparsity.methods.base import SparsityMethod, register


@register
class Dense(SparsityMethod):
    name = "none"
    help = "none (dense)"
    dense = True

    @classmethod
    def describe(cls, q) -> str:
        return "dense" + (" int8" if q.quantize_activations else "")

    def sparsify(self, x, sp, stats):
        if stats is not None:
            stats.record(x)
        return x

    def decode_keep(self, sp, d):
        return "int8 quantized input" if sp.quantize else 0

    def decode_step_op(self, sp, d):
        return {"op": "none"}
