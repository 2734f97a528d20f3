"""BitNet b1.58 fake quantization with straight-through gradients.

* weights: ternary absmean, ``α = mean|W|``, ``W_q = clamp(round(W/(α+ε)), -1, 1)·α`` ∈ {-α, 0, α};
* activations: per-token absmax int8 (the same quantizer as ``--qsparse-quantize-activations``).

Both are STE: the forward uses the quantized value, the backward the identity. Under tensor
parallelism ``α`` must be the mean over the *whole* matrix; the parallel layers own that reduction.
"""

from __future__ import annotations

import torch

from megatron_qsparse.sparsity.topk import quantize_int8, straight_through


def _ternarize(w: torch.Tensor, eps: float) -> torch.Tensor:
    wf = w.float()
    alpha = wf.abs().mean()
    return ((wf / (alpha + eps)).round_().clamp_(-1, 1) * alpha).to(w.dtype)


def ternary_weight(w: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """BitNet b1.58 ternary fake-quantized weight (values in ``{-α, 0, α}``), STE gradient."""
    return straight_through(w, lambda t: _ternarize(t, eps))


def int8_activation(x: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """BitNet's per-token absmax int8 activation fake quantization, STE gradient."""
    return quantize_int8(x, eps)
