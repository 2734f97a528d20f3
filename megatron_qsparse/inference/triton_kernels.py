"""The sparse decode GEMV on CUDA, as a Triton kernel. Import only with CUDA and Triton present
(or, for tests, with ``TRITON_INTERPRET=1``: CPU tensors through Triton's interpreter).

Same contract as :mod:`~megatron_qsparse.inference.cpu_kernels`: ``wt`` is the input-major
weight ``[in, out]``; program ``(j, r)`` computes ``BLOCK_N`` outputs of token ``r``, looping over
that token's kept inputs ``BLOCK_K`` at a time and loading, for each, a contiguous (coalesced) run
of its weight row, so only the kept rows are read; fp32 accumulation. The kept set of
:func:`gemv_topk` is exact Top-K (ties to the lower index, identical to
:func:`~megatron_qsparse.sparsity.masks.topk_mask`), chosen on the device by
:func:`megatron_qsparse.sparsity.triton_kernels.topk_sparsify`; the kept indices of every token are
gathered in ascending order by one stable sort of the mask, and the per-token counts stay on the
device, so neither function waits on the host and all tokens go in one launch.

``tests/unit/test_triton_kernels.py`` runs both functions against ``xs @ wt`` (interpreter on CPU,
the GPU with CUDA), ``tests/unit/test_decode_kernels.py`` also on CUDA.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from megatron_qsparse.sparsity.triton_kernels import topk_sparsify

BLOCK_N = 128
BLOCK_K = 32


@triton.jit
def _sparse_gemv(idx_ptr, val_ptr, cnt_ptr, w_ptr, bias_ptr, y_ptr, N, ld, stride_w,
                 HAS_BIAS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    pid = tl.program_id(0)
    tok = tl.program_id(1).to(tl.int64)
    cols = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    cmask = cols < N
    cnt = tl.load(cnt_ptr + tok).to(tl.int32)  # kept inputs of this token
    acc = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for k0 in range(0, cnt, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        kmask = ks < cnt
        rows = tl.load(idx_ptr + tok * ld + ks, mask=kmask, other=0).to(tl.int64)
        v = tl.load(val_ptr + tok * ld + ks, mask=kmask, other=0.0).to(tl.float32)
        w = tl.load(w_ptr + rows[:, None] * stride_w + cols[None, :],
                    mask=kmask[:, None] & cmask[None, :], other=0.0).to(tl.float32)
        acc += tl.sum(w * v[:, None], axis=0)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + cols, mask=cmask, other=0.0).to(tl.float32)
    tl.store(y_ptr + tok * N + cols, acc, mask=cmask)


def _gemv_kept(x: torch.Tensor, mask: torch.Tensor, counts: torch.Tensor, wt: torch.Tensor,
               bias: torch.Tensor | None) -> torch.Tensor:
    """``y[r] = sum over the kept i of x[r, i] · wt[i] (+ bias)`` in fp32; ``x`` and ``mask``
    ``[R, d]``, ``counts`` the kept count per row (on the device)."""
    wt = wt.contiguous()
    rows, d = x.shape
    n = wt.shape[1]
    idx = torch.sort(mask.to(torch.uint8), dim=-1, descending=True, stable=True).indices
    val = x.gather(-1, idx).contiguous()
    y = torch.empty(rows, n, dtype=torch.float32, device=wt.device)
    if rows == 0 or n == 0:
        return y
    grid = (triton.cdiv(n, BLOCK_N), rows)
    _sparse_gemv[grid](idx, val, counts.to(torch.int32).contiguous(), wt,
                       bias.contiguous() if bias is not None else y, y, n, d, wt.stride(0),
                       HAS_BIAS=bias is not None, BLOCK_N=BLOCK_N, BLOCK_K=BLOCK_K)
    return y


def gemv_rows(idx: torch.Tensor, val: torch.Tensor, wt: torch.Tensor,
              bias: torch.Tensor | None = None) -> torch.Tensor:
    """``y[n] = sum_r val[r] · wt[idx[r], n] (+ bias)`` in fp32 for one token."""
    wt = wt.contiguous()
    n = wt.shape[1]
    y = torch.empty(1, n, dtype=torch.float32, device=wt.device)
    if n == 0:
        return y.view(n)
    counts = torch.full((1,), idx.numel(), dtype=torch.int32, device=wt.device)
    _sparse_gemv[(triton.cdiv(n, BLOCK_N), 1)](
        idx.contiguous(), val.contiguous(), counts, wt,
        bias.contiguous() if bias is not None else y, y, n, max(idx.numel(), 1), wt.stride(0),
        HAS_BIAS=bias is not None, BLOCK_N=BLOCK_N, BLOCK_K=BLOCK_K)
    return y.view(n)


def gemv_topk(x: torch.Tensor, wt: torch.Tensor, k: int,
              bias: torch.Tensor | None = None) -> torch.Tensor:
    """``(x * topk_mask(x, k)) @ wt (+ bias)`` in fp32, ``x [..., d]``; all tokens in one launch,
    no host sync."""
    d = wt.shape[0]
    rows = x.reshape(-1, d)
    k = max(0, min(int(k), d))
    kt = torch.full((), k, dtype=torch.int64, device=x.device)
    _, mask, _ = topk_sparsify(rows, kt, True)
    counts = torch.full((rows.shape[0],), k, dtype=torch.int32, device=x.device)
    return _gemv_kept(rows, mask, counts, wt, bias).view(*x.shape[:-1], wt.shape[1])


def gemv_nonzero(x: torch.Tensor, wt: torch.Tensor,
                 bias: torch.Tensor | None = None) -> torch.Tensor:
    """``x @ wt (+ bias)`` in fp32 reading only the rows where ``x`` is nonzero; the per-token
    counts stay on the device (no host sync)."""
    d = wt.shape[0]
    rows = x.reshape(-1, d)
    mask = rows != 0
    counts = mask.sum(-1, dtype=torch.int32)
    return _gemv_kept(rows, mask, counts, wt, bias).view(*x.shape[:-1], wt.shape[1])
