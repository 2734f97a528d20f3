"""The sparse decode GEMV on CUDA, as a Triton kernel. Import only with CUDA and Triton present.

Same contract as :mod:`~megatron_qsparse.inference.cpu_kernels`: ``wt`` is the input-major
weight ``[in, out]``; one program computes ``BLOCK_N`` outputs, looping over the kept inputs
``BLOCK_K`` at a time and loading, for each, a contiguous (coalesced) run of its weight row, so
only the kept rows are read. The kept set of :func:`gemv_topk` is the reference
:func:`~megatron_qsparse.sparsity.methods.topk.topk_mask` (exact Top-K, ties to the lower index), whose indices
are gathered in ascending order without a host sync (a stable sort of the mask).

Untested on hardware where this project is developed (no GPU there); ``tests/unit/
test_decode_kernels.py`` runs it against the dense reference whenever CUDA is available.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from megatron_qsparse.sparsity.methods.topk import topk_mask

BLOCK_N = 128
BLOCK_K = 32


@triton.jit
def _sparse_gemv(idx_ptr, val_ptr, w_ptr, bias_ptr, y_ptr, K, N, stride_w,
                 HAS_BIAS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    pid = tl.program_id(0)
    cols = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    cmask = cols < N
    acc = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        kmask = ks < K
        rows = tl.load(idx_ptr + ks, mask=kmask, other=0).to(tl.int64)
        v = tl.load(val_ptr + ks, mask=kmask, other=0.0).to(tl.float32)
        w = tl.load(w_ptr + rows[:, None] * stride_w + cols[None, :],
                    mask=kmask[:, None] & cmask[None, :], other=0.0).to(tl.float32)
        acc += tl.sum(w * v[:, None], axis=0)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + cols, mask=cmask, other=0.0).to(tl.float32)
    tl.store(y_ptr + cols, acc, mask=cmask)


def gemv_rows(idx: torch.Tensor, val: torch.Tensor, wt: torch.Tensor,
              bias: torch.Tensor | None = None) -> torch.Tensor:
    """``y[n] = sum_r val[r] · wt[idx[r], n] (+ bias)`` in fp32 for one token."""
    wt = wt.contiguous()
    n = wt.shape[1]
    y = torch.empty(n, dtype=torch.float32, device=wt.device)
    grid = (triton.cdiv(n, BLOCK_N),)
    _sparse_gemv[grid](idx.contiguous(), val.contiguous(), wt, bias if bias is not None else y, y,
                       idx.numel(), n, wt.stride(0), HAS_BIAS=bias is not None,
                       BLOCK_N=BLOCK_N, BLOCK_K=BLOCK_K)
    return y


def gemv_topk(x: torch.Tensor, wt: torch.Tensor, k: int,
              bias: torch.Tensor | None = None) -> torch.Tensor:
    """``topk(x, k) @ wt (+ bias)`` in fp32, ``x [..., d]`` on CUDA, rows computed one by one."""
    d = wt.shape[0]
    rows = x.reshape(-1, d)
    out = []
    for r in rows:
        mask = topk_mask(r, k)
        idx = torch.sort(mask.to(torch.uint8), descending=True, stable=True).indices[:k]
        out.append(gemv_rows(idx, r[idx], wt, bias))
    return torch.stack(out).view(*x.shape[:-1], wt.shape[1])


def gemv_nonzero(x: torch.Tensor, wt: torch.Tensor,
                 bias: torch.Tensor | None = None) -> torch.Tensor:
    """``x @ wt (+ bias)`` in fp32 reading only the rows where ``x`` is nonzero (one host sync
    per row for the count)."""
    d = wt.shape[0]
    out = []
    for r in x.reshape(-1, d):
        idx = r.nonzero().view(-1)
        out.append(gemv_rows(idx, r[idx], wt, bias))
    return torch.stack(out).view(*x.shape[:-1], wt.shape[1])
