"""Block 2:4 activations on sparse tensor cores (batched inference on NVIDIA Ampere or newer).

With ``--qsparse-mode block --qsparse-block 2:4`` every group of 4 consecutive input features of
every token keeps at most 2 nonzeros. That is the pattern NVIDIA's sparse tensor cores take for
the *first* operand of a matmul, so ``Y = X_s Wᵀ`` can run with ``X_s`` compressed to half its
values plus 2-bit indices (:func:`torch.sparse.to_sparse_semi_structured`): half the multiply-adds
of the dense GEMM. What it buys: for large batches (prefill, batched serving; fp16/bf16, compute
capability ≥ 8.0) up to ~2× on the GEMM's math, in practice less (NVIDIA and PyTorch report ~1.1-
1.6× end-to-end for 2:4 *weights*) and minus the cost of compressing ``X_s`` at every call. It does
nothing for batch-1 decode, which is bound by weight traffic: there the sparse GEMV reads only the
kept rows (:mod:`.cpu_kernels`, :mod:`.triton_kernels`), and a pattern of ``N`` of every ``M``
gives the same ``M/N`` reduction of bytes as Top-K at ``S = 1 - N/M``. On a CPU, or a GPU older
than Ampere, there is no 2:4 hardware and :func:`block24_linear` is not available.

Untested on hardware where this project is developed (no GPU there); the test in
``tests/unit/test_decode_kernels.py`` runs whenever a suitable GPU is present.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

DTYPES = (torch.float16, torch.bfloat16)


def unavailable_reason(device: torch.device | str | None = None) -> str | None:
    """Why 2:4 semi-structured matmuls cannot run here (None when they can)."""
    if not torch.cuda.is_available():
        return "no CUDA device"
    major, _ = torch.cuda.get_device_capability(device)
    if major < 8:
        return f"compute capability {major}.x < 8.0 (sparse tensor cores need Ampere or newer)"
    if not hasattr(torch.sparse, "to_sparse_semi_structured"):
        return "this PyTorch has no torch.sparse.to_sparse_semi_structured"
    return None


def applies(block_nm: tuple[int, int] | None) -> bool:
    """Whether an N:M pattern has at most 2 nonzeros in every aligned group of 4 (2:4, 1:4, 1:2)."""
    if block_nm is None:
        return False
    n, m = block_nm
    return (m == 4 and n <= 2) or (m == 2 and n <= 1)


def block24_linear(xs: torch.Tensor, weight: torch.Tensor,
                   bias: torch.Tensor | None = None) -> torch.Tensor:
    """``xs @ weight.T (+ bias)`` with ``xs [..., d]`` 2:4-sparse along ``d`` on sparse tensor cores.

    ``weight`` is ``[out, d]`` (fp16/bf16, CUDA). Tokens, ``d`` and ``out`` are padded to multiples
    of 64 with zeros (which keep the pattern and meet the kernels' shape rules); the result is cut
    back.
    """
    reason = unavailable_reason(xs.device)
    if reason:
        raise RuntimeError(f"2:4 semi-structured matmul unavailable: {reason}")
    if xs.dtype not in DTYPES or weight.dtype != xs.dtype:
        raise ValueError("block24_linear: xs and weight must both be float16 or bfloat16")
    d = xs.shape[-1]
    rows = xs.reshape(-1, d)
    t = rows.shape[0]
    out = weight.shape[0]
    pad_t, pad_d, pad_o = (-t) % 64, (-d) % 64, (-out) % 64
    a = F.pad(rows, (0, pad_d, 0, pad_t))
    w = F.pad(weight, (0, pad_d, 0, pad_o))
    a_sparse = torch.sparse.to_sparse_semi_structured(a)
    y = torch.mm(a_sparse, w.t().contiguous())[:t, :out]
    if bias is not None:
        y = y + bias
    return y.view(*xs.shape[:-1], weight.shape[0])
