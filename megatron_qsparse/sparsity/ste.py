"""The straight-through pieces every sparsifier method is built from.

* :func:`straight_through` — ``fn(x)`` forward, identity backward (STE).
* :func:`quantize_int8` — per-token absmax int8 fake quantization (``--qsparse-quantize-activations``
  and BitNet's activations), STE.
* :func:`apply_mask` — ``x ⊙ mask`` with the STE backward (the mask treated as identity) or, with
  ``ste=False`` (``--no-ste``), the masked gradient; optional L2 rescale of the kept entries.
The selecting kernels, with the same forward/backward, are the custom ops of ``ops.py``.

See DESIGN.md, "The method, precisely".
"""

from __future__ import annotations

import torch


class _StraightThrough(torch.autograd.Function):
    """``y = fn(x)`` forward, ``∂L/∂x = ∂L/∂y`` backward. Saves nothing."""

    @staticmethod
    def forward(ctx, x, fn):
        return fn(x)

    @staticmethod
    def backward(ctx, grad):
        return grad, None


def straight_through(x: torch.Tensor, fn) -> torch.Tensor:
    """Apply ``fn`` in the forward pass and the identity in the backward pass (STE)."""
    return _StraightThrough.apply(x, fn)


def _fake_quant_int8(x: torch.Tensor, eps: float, gamma: torch.Tensor | None) -> torch.Tensor:
    xf = x.float()
    gamma = (xf.abs().amax(-1, keepdim=True) if gamma is None else gamma.float()) + eps
    return ((xf * (127.0 / gamma)).round_().clamp_(-128, 127) * (gamma / 127.0)).to(x.dtype)


def quantize_int8(x: torch.Tensor, eps: float = 1e-5, *,
                  gamma: torch.Tensor | None = None) -> torch.Tensor:
    """Per-token absmax int8 fake quantization with STE.

    ``γ = max|x|`` over the last dim; ``Q(x) = clamp(round(127·x/(γ+ε)), -128, 127)·(γ+ε)/127``.
    Computed in fp32, returned in ``x.dtype``; the gradient passes through unchanged. ``gamma``
    (``[..., 1]``) replaces ``max|x|``: the row-wide value when ``x`` is a tensor-parallel slice.
    """
    return straight_through(x, lambda t: _fake_quant_int8(t, eps, gamma))


def _mask_backward(ctx, grad: torch.Tensor) -> torch.Tensor:
    """Shared backward of the masking functions: ``grad (⊙ mask) (· scale)``."""
    saved = list(ctx.saved_tensors)
    scale = saved.pop() if ctx.has_scale else None
    if not ctx.ste:
        grad = grad * saved[0]
    if scale is not None:
        grad = grad * scale
    return grad


class _ApplyMask(torch.autograd.Function):
    """``y = x ⊙ mask (· scale)``.

    Backward with ``ste``: ``grad (· scale)`` — nothing is saved except the per-token ``scale``
    when rescaling. Without ``ste``: ``grad ⊙ mask (· scale)``, saving only the bool mask.
    """

    @staticmethod
    def forward(ctx, x, mask, scale, ste):
        ctx.ste = ste
        ctx.has_scale = scale is not None
        saved = ([] if ste else [mask]) + ([scale] if scale is not None else [])
        ctx.save_for_backward(*saved)
        y = x * mask
        return y.mul_(scale) if scale is not None else y

    @staticmethod
    def backward(ctx, grad):
        return _mask_backward(ctx, grad), None, None, None


def l2_scale(x: torch.Tensor, sparse: torch.Tensor, sums=None) -> torch.Tensor:
    """Per-token ``‖x‖ / ‖sparse‖`` in fp32 (1 where ``sparse`` is all zero), in ``x.dtype``.

    ``sums``: a function that adds a ``[2, tokens]`` tensor of squared norms up in place across
    the slices of a row (the tensor-parallel case); None for a whole row.
    """
    with torch.no_grad():
        if sums is None:
            dense = torch.linalg.vector_norm(x.detach().float(), dim=-1, keepdim=True)
            kept = torch.linalg.vector_norm(sparse.detach().float(), dim=-1, keepdim=True)
        else:
            sq = torch.stack([x.detach().float().square().sum(-1),
                              sparse.detach().float().square().sum(-1)])
            sums(sq)
            dense, kept = sq.sqrt().unsqueeze(-1).unbind(0)
        return torch.where(kept > 0, dense / kept.clamp_min(1e-30), 1.0).to(x.dtype)


RESCALES = ("none", "l2")


def check_rescale(rescale: str) -> None:
    if rescale not in RESCALES:
        raise ValueError(f"--qsparse-rescale: unknown rescale {rescale!r}; use none or l2")


def apply_mask(x: torch.Tensor, mask: torch.Tensor, *, ste: bool = True,
               rescale: str = "none", sums=None) -> torch.Tensor:
    """Zero ``x`` outside ``mask``; STE or masked gradient; optional ``"l2"`` rescale.

    The L2 rescale multiplies the kept entries by ``‖x‖ / ‖x ⊙ mask‖`` per token (1 for an all-zero
    row); the factor is a constant for autograd, so the STE gradient is ``grad · factor``.
    ``sums``: see :func:`l2_scale` (``x`` is a tensor-parallel slice of the row).
    """
    check_rescale(rescale)
    scale = l2_scale(x, x.detach() * mask, sums) if rescale == "l2" else None
    return _ApplyMask.apply(x, mask, scale, ste)
