"""Megatron's tensor-parallel linear and embedding layers; every linear sparsifies its input.

Weights are ``[out, in]`` like :class:`torch.nn.Linear`; the product is ``F.linear``. Each layer
is built with a :class:`~megatron_qsparse.parallel.state.ParallelState` (default: the current one)
and holds only its TP rank's shard; at TP = 1 it is the plain single-device layer.

* :class:`ColumnParallelLinear` splits the *outputs*. Its input is whole (replicated) on every
  rank, so it is sparsified once, before the matmul, exactly as on one device; the input's
  gradient is all-reduced. Fused projections (``[q; k; v]``, ``[gate; up]``) pass
  ``output_sizes``: each part is split separately, so a rank holds ``[its q; its k; its v]``.
* :class:`RowParallelLinear` splits the *inputs*: each rank holds a contiguous slice of the input
  features, sparsified with the row-wide Top-K threshold agreed across the TP group
  (:mod:`megatron_qsparse.parallel.sparsify`); partial outputs are all-reduced and the (replicated)
  bias is added once after the reduction.
* :class:`VocabParallelEmbedding` splits the vocabulary; :func:`parallel_lm_logits` is the LM
  head over the (tied or untied) vocab-parallel weight.

Sharded parameters carry Megatron's attributes (DeepSpeed reads ``tensor_model_parallel`` to
count their gradient norm on every TP rank): ``partition_dim``, ``partition_sizes`` (the full
sizes of the fused parts along that dim) and ``partition_count`` (the TP size).
:mod:`megatron_qsparse.parallel.sharding` cuts and joins state dicts with them.

Initialisation is TP-invariant: the full weight is drawn from the default generator (identical on
every rank) and the rank keeps its shard, so a TP model starts from the weights of the TP = 1 model
with the same seed.

BitNet (``bitnet=True``): the input is sparsified first, then int8-quantized per token (``γ`` of
the whole row), and the weight is ternarized with ``α = mean|W|`` of the *whole* matrix;
``Y = int8(sparsify(X)) · ternary(W)ᵀ``. Sparsifying first keeps zeros exactly zero and, for
Top-K, leaves ``γ = max|x|`` unchanged, so this matches quantize-then-select up to ties created by
rounding. The bias is never quantized.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from megatron_qsparse.parallel.mappings import (all_reduce, copy_to_tensor_parallel,
                                                gather_from_tensor_parallel,
                                                reduce_from_tensor_parallel)
from megatron_qsparse.parallel.sharding import shard_tensor
from megatron_qsparse.parallel.sparsify import quantize_int8_sharded, sparsify_sharded
from megatron_qsparse.parallel.state import ParallelState, get_parallel_state
from megatron_qsparse.sparsity.bitnet import int8_activation, ternary_weight


def divide(n: int, tp: int, what: str) -> int:
    """``n / tp``, or a one-line error naming ``what`` (a flag or a layer dimension)."""
    if n % tp:
        raise ValueError(f"{what}: {n} is not divisible by the tensor-parallel size {tp}; use a "
                         f"multiple of {tp} or a --tensor-model-parallel-size that divides {n}")
    return n // tp


def set_partition(param: torch.Tensor, dim: int, sizes: tuple[int, ...], count: int) -> None:
    """Mark ``param`` as a TP shard along ``dim`` of a full tensor made of parts ``sizes``."""
    param.tensor_model_parallel = count > 1
    param.partition_dim = dim
    param.partition_sizes = tuple(int(s) for s in sizes)
    param.partition_count = count


def full_numel(p: torch.Tensor) -> int:
    """Number of elements of the full (unsharded) tensor ``p`` is a TP shard of (also under
    ZeRO-3, where ``p`` itself is an empty placeholder and DeepSpeed keeps the size in
    ``ds_numel``)."""
    return getattr(p, "ds_numel", p.numel()) * getattr(p, "partition_count", 1)


def _init_sharded(param: nn.Parameter, std: float, full_shape: tuple[int, ...], dim: int,
                  sizes: tuple[int, ...], state: ParallelState) -> None:
    """N(0, std) drawn for the full tensor (same draws on every rank), then this rank's shard."""
    if state.tp_size == 1:
        nn.init.normal_(param, mean=0.0, std=std)
        return
    full = torch.empty(full_shape, dtype=param.dtype, device=param.device)
    nn.init.normal_(full, mean=0.0, std=std)
    with torch.no_grad():
        param.copy_(shard_tensor(full, dim, sizes, state.tp_rank, state.tp_size))


def _global_alpha(w: torch.Tensor, state: ParallelState) -> torch.Tensor | None:
    """BitNet ``α = mean|W|`` over the full matrix (None at TP = 1: the local mean is the mean)."""
    if state.tp_size == 1:
        return None
    s = torch.sum(w.detach().abs(), dtype=torch.float64).reshape(1)
    all_reduce(s, state)
    return (s[0] / full_numel(w)).to(torch.promote_types(w.dtype, torch.float32))


class _SparseLinear(nn.Module):
    def __init__(self, input_size: int, output_size: int, *, bias: bool,
                 sparsifier: nn.Module | None, init_method_std: float, bitnet: bool,
                 parallel: ParallelState | None, split_dim: int, sizes: tuple[int, ...]):
        super().__init__()
        self.parallel = parallel if parallel is not None else get_parallel_state()
        tp = self.parallel.tp_size
        self.input_size, self.output_size, self.bitnet = input_size, output_size, bitnet
        name = type(self).__name__
        what = "output" if split_dim == 0 else "input"
        for s in sizes:
            divide(s, tp, f"{name} {what} size")
        local = [output_size, input_size]
        local[split_dim] //= tp
        self.weight = nn.Parameter(torch.empty(*local))
        set_partition(self.weight, split_dim, sizes, tp)
        _init_sharded(self.weight, init_method_std, (output_size, input_size), split_dim, sizes,
                      self.parallel)
        if bias:
            self.bias = nn.Parameter(torch.zeros(local[0]))
            if split_dim == 0:
                set_partition(self.bias, 0, sizes, tp)
        else:
            self.register_parameter("bias", None)
        self.sparsifier = sparsifier.bind(input_size) if sparsifier is not None else None

    def _weight(self) -> torch.Tensor:
        if not self.bitnet:
            return self.weight
        alpha = _global_alpha(self.weight, self.parallel)
        return ternary_weight(self.weight) if alpha is None else ternary_weight(self.weight,
                                                                                 alpha=alpha)

    def extra_repr(self) -> str:
        tp = self.parallel.tp_size
        return (f"in={self.input_size}, out={self.output_size}, bias={self.bias is not None}, "
                f"bitnet={self.bitnet}" + (f", tp={tp}" if tp > 1 else ""))


class ColumnParallelLinear(_SparseLinear):
    """``Y = sparsify(X) Wᵀ + b`` with the outputs split across TP ranks.

    ``W: [output_size / tp, input_size]`` on each rank. The input is whole on every rank (it is
    sparsified once, identically everywhere); the output is this rank's slice of the outputs
    (``gather_output=True`` all-gathers it). ``output_sizes`` lists the parts of a fused output
    (default one part); each part is split separately. ``sparsifier=None`` means a dense input.
    """

    def __init__(self, input_size: int, output_size: int, *, bias: bool = False,
                 sparsifier: nn.Module | None = None, init_method_std: float = 0.02,
                 bitnet: bool = False, parallel: ParallelState | None = None,
                 output_sizes: tuple[int, ...] | None = None, gather_output: bool = False):
        sizes = tuple(output_sizes) if output_sizes else (output_size,)
        if sum(sizes) != output_size:
            raise ValueError(f"output_sizes {sizes} do not add up to output_size {output_size}")
        super().__init__(input_size, output_size, bias=bias, sparsifier=sparsifier,
                         init_method_std=init_method_std, bitnet=bitnet, parallel=parallel,
                         split_dim=0, sizes=sizes)
        self.gather_output = gather_output

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = copy_to_tensor_parallel(x, self.parallel)
        if self.sparsifier is not None:
            x = self.sparsifier(x)
        if self.bitnet:
            x = int8_activation(x)
        y = F.linear(x, self._weight(), self.bias)
        return gather_from_tensor_parallel(y, self.parallel) if self.gather_output else y


class RowParallelLinear(_SparseLinear):
    """``Y = sparsify(X) Wᵀ + b`` with the inputs split across TP ranks.

    ``W: [output_size, input_size / tp]`` on each rank; the input is this rank's slice of the
    features (``[r·in/tp, (r+1)·in/tp)``). The sparsifier sees the whole row through the agreed
    threshold (:func:`~megatron_qsparse.parallel.sparsify.sparsify_sharded`); partial outputs are
    all-reduced, then the bias is added. ``sparsifier=None`` means a dense input.
    """

    def __init__(self, input_size: int, output_size: int, *, bias: bool = False,
                 sparsifier: nn.Module | None = None, init_method_std: float = 0.02,
                 bitnet: bool = False, parallel: ParallelState | None = None):
        super().__init__(input_size, output_size, bias=bias, sparsifier=sparsifier,
                         init_method_std=init_method_std, bitnet=bitnet, parallel=parallel,
                         split_dim=1, sizes=(input_size,))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.sparsifier is not None:
            x = sparsify_sharded(self.sparsifier, x, self.parallel)
        if self.bitnet:
            x = quantize_int8_sharded(x, self.parallel)  # BitNet's int8 activation, row-wide γ
        y = reduce_from_tensor_parallel(F.linear(x, self._weight()), self.parallel)
        return y if self.bias is None else y + self.bias


class VocabParallelEmbedding(nn.Module):
    """Token embedding ``[num_embeddings, embedding_dim]``, the vocabulary split across TP ranks.

    Rank ``r`` holds rows ``[r·V/tp, (r+1)·V/tp)``; tokens outside its range look up zeros, and the
    partial embeddings are all-reduced.
    """

    def __init__(self, num_embeddings: int, embedding_dim: int, init_method_std: float = 0.02,
                 parallel: ParallelState | None = None):
        super().__init__()
        self.parallel = parallel if parallel is not None else get_parallel_state()
        tp = self.parallel.tp_size
        self.num_embeddings, self.embedding_dim = num_embeddings, embedding_dim
        per_rank = divide(num_embeddings, tp, "padded vocabulary size (raise "
                          "--make-vocab-size-divisible-by or set --vocab-size)")
        self.vocab_start = self.parallel.tp_rank * per_rank
        self.vocab_end = self.vocab_start + per_rank
        self.weight = nn.Parameter(torch.empty(per_rank, embedding_dim))
        set_partition(self.weight, 0, (num_embeddings,), tp)
        _init_sharded(self.weight, init_method_std, (num_embeddings, embedding_dim), 0,
                      (num_embeddings,), self.parallel)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        if self.parallel.tp_size == 1:
            return F.embedding(tokens, self.weight)
        outside = (tokens < self.vocab_start) | (tokens >= self.vocab_end)
        local = (tokens - self.vocab_start).masked_fill(outside, 0)
        out = F.embedding(local, self.weight).masked_fill(outside.unsqueeze(-1), 0.0)
        return reduce_from_tensor_parallel(out, self.parallel)

    def extra_repr(self) -> str:
        tp = self.parallel.tp_size
        return f"{self.num_embeddings}, {self.embedding_dim}" + (f", tp={tp}" if tp > 1 else "")


def parallel_lm_logits(h: torch.Tensor, weight: torch.Tensor, state: ParallelState
                       ) -> torch.Tensor:
    """LM head over a vocab-parallel ``weight [V/tp, h]``: this rank's ``[..., V/tp]`` logits
    (the input's gradient is all-reduced)."""
    return F.linear(copy_to_tensor_parallel(h, state), weight)
