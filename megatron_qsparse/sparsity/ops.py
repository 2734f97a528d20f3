"""The sparsifier kernels as ``torch.library`` custom ops: traceable by ``torch.compile``.

Three ops, each returning ``(y, mask, nonzero)``:

* ``qsparse::topk_sparsify(x, k, masked_grad)`` — the exact per-row Top-K of ``|x|`` (ties to the
  lower index). ``k`` is a 0-dim int64 *tensor* (``1 <= k <= d``): K is data, not a constant of
  the graph, so the sparsity warm-up (a new K every step) never recompiles;
* ``qsparse::int8_topk_sparsify(x, k, eps, masked_grad)`` — per-token int8 absmax fake
  quantization then Top-K (``--qsparse-quantize-activations``), fused on CUDA;
* ``qsparse::block_sparsify(x, n, m, masked_grad)`` — Block N:M.

``y`` is the sparse copy of ``x`` (dropped entries: a zero with the sign of ``x``), ``nonzero``
its nonzero count as a 0-dim int64 tensor on ``x``'s device (density statistics at no extra
pass, never read on the host in the step), ``mask`` the bool mask of kept entries when
``masked_grad`` (the ``--no-ste`` backward needs it) and an empty tensor otherwise.

Implementations: on CPU the compiled C++ kernels of ``kernels.py``; on CUDA the Triton kernels of
``triton_kernels.py`` when Triton is present; anywhere else (or with the kernels switched off)
the pure-PyTorch reference masks of ``methods/``, which need no host synchronisation either. The
fake (meta) implementations give ``torch.compile`` the output shapes; the autograd formula is the
straight-through estimator: ``grad_x = grad_y`` (``masked_grad``: ``grad_y ⊙ mask``). The
Triton module also serves the local candidate step of the tensor-parallel global Top-K
(:func:`topk_candidates`).
"""

from __future__ import annotations

import torch
from torch import Tensor

from megatron_qsparse.sparsity import kernels
from megatron_qsparse.sparsity.masks import block_mask, topk_mask

_EMPTY_MASK = (0,)


def _empty_mask(x: Tensor) -> Tensor:
    return x.new_empty(_EMPTY_MASK, dtype=torch.bool)


def _finish(x: Tensor, mask: Tensor, masked_grad: bool) -> tuple[Tensor, Tensor, Tensor]:
    y = x * mask
    return y, (mask if masked_grad else _empty_mask(x)), torch.count_nonzero(y)


def _cpu_kernel(fn, x: Tensor, masked_grad: bool, *args):
    y, mask, nz = fn(x, *args, masked_grad)
    mask = mask if mask is not None else _empty_mask(x)
    return y, mask, torch.tensor(nz, dtype=torch.int64)


# ---------------------------------------------------------------------------------------------
# Top-K


@torch.library.custom_op("qsparse::topk_sparsify", mutates_args=())
def topk_sparsify_op(x: Tensor, k: Tensor, masked_grad: bool) -> tuple[Tensor, Tensor, Tensor]:
    """See the module docstring. The default implementation serves every device."""
    d = x.shape[-1]
    if x.device.type == "cpu" and kernels.supports(x):
        kk = int(k)  # a CPU tensor: no device synchronisation
        if kk >= d:
            y = x.clone()
            return (y, torch.ones_like(x, dtype=torch.bool) if masked_grad else _empty_mask(x),
                    torch.count_nonzero(y))
        return _cpu_kernel(kernels.topk_sparsify, x, masked_grad, kk)
    tk = _triton()
    if tk is not None and x.is_cuda:
        y, mask, nz = tk.topk_sparsify(x, k, masked_grad)
        return y, (mask if mask is not None else _empty_mask(x)), nz
    return _finish(x, topk_mask(x, k.to(x.device)), masked_grad)


@topk_sparsify_op.register_fake
def _(x, k, masked_grad):
    mask = torch.empty_like(x, dtype=torch.bool) if masked_grad else _empty_mask(x)
    return torch.empty_like(x), mask, x.new_empty((), dtype=torch.int64)


@torch.library.custom_op("qsparse::int8_topk_sparsify", mutates_args=())
def int8_topk_sparsify_op(x: Tensor, k: Tensor, eps: float,
                          masked_grad: bool) -> tuple[Tensor, Tensor, Tensor]:
    """Per-token absmax int8 fake quantization, then Top-K: one pass on CUDA (Triton), the two
    steps in turn elsewhere; bit-identical to ``topk_sparsify(quantize_int8(x, eps), k)``."""
    from megatron_qsparse.sparsity.ste import _fake_quant_int8

    tk = _triton()
    if tk is not None and x.is_cuda:
        y, mask, nz = tk.int8_topk_sparsify(x, k, masked_grad, eps)
        return y, (mask if mask is not None else _empty_mask(x)), nz
    return topk_sparsify_op(_fake_quant_int8(x, eps, None), k, masked_grad)


@int8_topk_sparsify_op.register_fake
def _(x, k, eps, masked_grad):
    mask = torch.empty_like(x, dtype=torch.bool) if masked_grad else _empty_mask(x)
    return torch.empty_like(x), mask, x.new_empty((), dtype=torch.int64)


# ---------------------------------------------------------------------------------------------
# Block N:M


@torch.library.custom_op("qsparse::block_sparsify", mutates_args=())
def block_sparsify_op(x: Tensor, n: int, m: int,
                      masked_grad: bool) -> tuple[Tensor, Tensor, Tensor]:
    """See the module docstring. The default implementation serves every device."""
    if x.device.type == "cpu" and m <= kernels.MAX_BLOCK_M and kernels.supports(x):
        return _cpu_kernel(kernels.block_sparsify, x, masked_grad, n, m)
    tk = _triton()
    if tk is not None and x.is_cuda:
        y, mask, nz = tk.block_sparsify(x, n, m, masked_grad)
        return y, (mask if mask is not None else _empty_mask(x)), nz
    return _finish(x, block_mask(x, n, m), masked_grad)


@block_sparsify_op.register_fake
def _(x, n, m, masked_grad):
    mask = torch.empty_like(x, dtype=torch.bool) if masked_grad else _empty_mask(x)
    return torch.empty_like(x), mask, x.new_empty((), dtype=torch.int64)


# ---------------------------------------------------------------------------------------------
# autograd: the straight-through estimator (or the masked gradient)


def _setup(ctx, inputs, output):
    masked_grad = inputs[-1]
    ctx.masked_grad = masked_grad
    ctx.save_for_backward(output[1] if masked_grad else None)


def _backward_topk(ctx, grad_y, grad_mask, grad_nz):
    return (grad_y * ctx.saved_tensors[0] if ctx.masked_grad else grad_y), None, None


def _backward_block(ctx, grad_y, grad_mask, grad_nz):
    return (grad_y * ctx.saved_tensors[0] if ctx.masked_grad else grad_y), None, None, None


def _backward_int8_topk(ctx, grad_y, grad_mask, grad_nz):
    return (grad_y * ctx.saved_tensors[0] if ctx.masked_grad else grad_y), None, None, None


topk_sparsify_op.register_autograd(_backward_topk, setup_context=_setup)
int8_topk_sparsify_op.register_autograd(_backward_int8_topk, setup_context=_setup)
block_sparsify_op.register_autograd(_backward_block, setup_context=_setup)


_TRITON: list = []


def _triton():
    """The Triton kernels module when Triton and CUDA are present, else None (tried once)."""
    if not _TRITON:
        mod = None
        if torch.cuda.is_available():
            try:
                from megatron_qsparse.sparsity import triton_kernels as mod
            except ImportError:
                mod = None
        _TRITON.append(mod)
    return _TRITON[0]


def topk_candidates(a: Tensor, c: int, largest: bool) -> Tensor | None:
    """The Triton candidate step of the tensor-parallel global Top-K for a CUDA ``a``, or None
    (the caller then selects with ``torch.topk``)."""
    tk = _triton()
    return tk.topk_candidates(a, c, largest) if tk is not None and a.is_cuda else None


__all__ = ["block_sparsify_op", "int8_topk_sparsify_op", "topk_candidates", "topk_sparsify_op"]
