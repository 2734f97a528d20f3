"""Megatron-named linear and embedding layers; every linear sparsifies its input.

Tensor parallelism is not wired yet (TP = 1): each class holds the full weight. Adding a
``tp_group`` later changes only these classes — the weight becomes a shard along ``out``
(column-parallel) or ``in`` (row-parallel), the output is gathered / all-reduced, and the
row-parallel sparsifier agrees its Top-K threshold across the group (its input is split) — while
the model code that builds them stays the same.

Weights are ``[out, in]`` like :class:`torch.nn.Linear`; the product is ``F.linear``.

BitNet (``bitnet=True``): the input is sparsified first, then int8-quantized per token, and the
weight is ternarized; ``Y = int8(sparsify(X)) · ternary(W)ᵀ``. Sparsifying first keeps zeros exactly
zero and, for Top-K, leaves ``γ = max|x|`` (the quantization grid) unchanged, so this matches
quantize-then-select up to ties created by rounding. The bias is never quantized.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from megatron_qsparse.sparsity.bitnet import int8_activation, ternary_weight


class _SparseLinear(nn.Module):
    def __init__(self, input_size: int, output_size: int, *, bias: bool = False,
                 sparsifier: nn.Module | None = None, init_method_std: float = 0.02,
                 bitnet: bool = False):
        super().__init__()
        self.input_size, self.output_size, self.bitnet = input_size, output_size, bitnet
        self.weight = nn.Parameter(torch.empty(output_size, input_size))
        nn.init.normal_(self.weight, mean=0.0, std=init_method_std)
        if bias:
            self.bias = nn.Parameter(torch.zeros(output_size))
        else:
            self.register_parameter("bias", None)
        self.sparsifier = sparsifier

    def _prepare(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The (sparsified, maybe quantized) input and the (maybe ternary) weight."""
        if self.sparsifier is not None:
            x = self.sparsifier(x)
        w = self.weight
        if self.bitnet:
            x, w = int8_activation(x), ternary_weight(w)
        return x, w

    def extra_repr(self) -> str:
        return (f"in={self.input_size}, out={self.output_size}, bias={self.bias is not None}, "
                f"bitnet={self.bitnet}")


class ColumnParallelLinear(_SparseLinear):
    """``Y = sparsify(X) Wᵀ + b``, ``W: [output_size, input_size]``.

    Megatron's column-parallel layer (outputs split across TP ranks; the input is whole on every
    rank, so it is sparsified once). ``sparsifier=None`` means a dense input.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x, w = self._prepare(x)
        return F.linear(x, w, self.bias)


class RowParallelLinear(_SparseLinear):
    """``Y = sparsify(X) Wᵀ + b``, ``W: [output_size, input_size]``.

    Megatron's row-parallel layer (inputs split across TP ranks, partial outputs all-reduced, bias
    added once after the reduction). ``sparsifier=None`` means a dense input.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x, w = self._prepare(x)
        y = F.linear(x, w)  # under TP: all-reduce the partial sums here
        return y if self.bias is None else y + self.bias


class VocabParallelEmbedding(nn.Module):
    """Token embedding ``[num_embeddings, embedding_dim]`` (Megatron's vocab-parallel; TP = 1)."""

    def __init__(self, num_embeddings: int, embedding_dim: int, init_method_std: float = 0.02):
        super().__init__()
        self.num_embeddings, self.embedding_dim = num_embeddings, embedding_dim
        self.weight = nn.Parameter(torch.empty(num_embeddings, embedding_dim))
        nn.init.normal_(self.weight, mean=0.0, std=init_method_std)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return F.embedding(tokens, self.weight)

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}"
