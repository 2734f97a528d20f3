"""BitNet b1.58 fake quantization with straight-through gradients.

* weights: ternary absmean, ``α = mean|W|``, ``W_q = clamp(round(W/(α+ε)), -1, 1)·α`` ∈ {-α, 0, α};
* activations: per-token absmax int8 (the same quantizer as ``--qsparse-quantize-activations``).

Both are STE: the forward uses the quantized value, the backward the identity. Under tensor
parallelism ``α`` must be the mean over the *whole* matrix; the parallel layers own that reduction.
"""

from __future__ import annotations

import torch

from megatron_qsparse.sparsity.ste import quantize_int8, straight_through


def absmean(w: torch.Tensor) -> torch.Tensor:
    """``α = mean|w|``, accumulated in fp64 and returned in (at least) fp32: correctly rounded for
    any practical size, so it does not depend on the summation order (e.g. on how the matrix is
    split across tensor-parallel ranks, which add their shards' fp64 sums)."""
    total = torch.sum(w.detach().abs(), dtype=torch.float64)
    return (total / w.numel()).to(torch.promote_types(w.dtype, torch.float32))


def _ternarize(w: torch.Tensor, eps: float, alpha: torch.Tensor | None = None) -> torch.Tensor:
    wf = w.to(torch.promote_types(w.dtype, torch.float32))
    alpha = absmean(w) if alpha is None else alpha.to(wf.dtype)
    return ((wf / (alpha + eps)).round_().clamp_(-1, 1) * alpha).to(w.dtype)


def ternary_weight(w: torch.Tensor, eps: float = 1e-5, *,
                   alpha: torch.Tensor | None = None) -> torch.Tensor:
    """BitNet b1.58 ternary fake-quantized weight (values in ``{-α, 0, α}``), STE gradient.

    ``alpha`` overrides :func:`absmean` of ``w``: a tensor-parallel layer holding a shard of the
    matrix passes the mean over the whole matrix (a 0-dim tensor, accumulated in fp64).
    """
    return straight_through(w, lambda t: _ternarize(t, eps, alpha))


def int8_activation(x: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """BitNet's per-token absmax int8 activation fake quantization, STE gradient."""
    return quantize_int8(x, eps)
