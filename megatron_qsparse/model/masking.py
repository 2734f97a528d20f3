"""Attention that stays inside documents: the block-diagonal causal mask of packed sequences.

A sequence that holds several documents (packed SFT samples, or pretraining text with
``--reset-attention-mask``) carries ``segment_ids [b, s]``: the document of every position,
non-decreasing along the sequence. Query ``i`` attends to key ``j`` iff ``j <= i`` and both lie
in the same document. The mask is built here, inside attention, from the segment ids (the same
on every tensor-parallel rank, since every rank of a TP group reads the same batch), on the
device, with no host synchronisation:

* everywhere: a boolean ``[b, 1, s, s]`` mask through ``F.scaled_dot_product_attention``
  (CPU: its flash/math kernels; CUDA: the memory-efficient kernel, which takes any mask);
* CUDA, when FlexAttention is available and the call fits it (no attention dropout, fp32/bf16/
  fp16, head dim a power of two >= 16): ``flex_attention`` with a block mask made from the same
  rule, so fully masked tiles (other documents) are skipped instead of computed. It is compiled
  on first use (or traced into ``--torch-compile``'s graph). ``FLEX_ON_CUDA = False`` turns it
  off. The GPU path has not run on a GPU yet; its rule is checked against the SDPA mask on CPU.

Without segment ids attention keeps its ``is_causal=True`` fast path (``model/transformer.py``).
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

#: Use FlexAttention for document masks on CUDA when it applies (see the module docstring).
FLEX_ON_CUDA = True


def document_causal_mask(segment_ids: torch.Tensor) -> torch.Tensor:
    """``[b, 1, s, s]`` boolean mask, True where query ``i`` may attend to key ``j``: ``j <= i``
    and ``segment_ids[:, i] == segment_ids[:, j]``. The diagonal is always True (no empty row)."""
    s = segment_ids.shape[-1]
    same = segment_ids[:, :, None] == segment_ids[:, None, :]
    causal = torch.ones(s, s, dtype=torch.bool, device=segment_ids.device).tril()
    return (same & causal).unsqueeze(1)


def _flex_fits(q: torch.Tensor, dropout_p: float) -> bool:
    hd = q.shape[-1]
    return (FLEX_ON_CUDA and q.is_cuda and dropout_p == 0.0 and _flex() is not None
            and q.dtype in (torch.float32, torch.bfloat16, torch.float16)
            and hd >= 16 and hd & (hd - 1) == 0)


@functools.lru_cache(maxsize=1)
def _flex():
    """``(flex_attention compiled, flex_attention, create_block_mask)``, or None where this
    torch has no FlexAttention."""
    try:
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention
    except ImportError:
        return None
    return torch.compile(flex_attention, dynamic=False), flex_attention, create_block_mask


def flex_document_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                            segment_ids: torch.Tensor, enable_gqa: bool,
                            compiled: bool = True) -> torch.Tensor:
    """FlexAttention with the block mask of :func:`document_causal_mask`'s rule (the CUDA path;
    ``compiled=False`` runs the unfused reference, which the CPU tests compare with SDPA)."""
    flex_compiled, flex_eager, create_block_mask = _flex()

    def same_document_causal(b, h, q_idx, kv_idx):
        return (q_idx >= kv_idx) & (segment_ids[b, q_idx] == segment_ids[b, kv_idx])

    b, s = segment_ids.shape
    block_mask = create_block_mask(same_document_causal, b, None, s, s, device=q.device)
    inside_compile = torch.compiler.is_compiling()
    fn = flex_compiled if compiled and not inside_compile else flex_eager
    return fn(q, k, v, block_mask=block_mask, enable_gqa=enable_gqa)


def document_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                       segment_ids: torch.Tensor, dropout_p: float = 0.0,
                       enable_gqa: bool = False) -> torch.Tensor:
    """Causal attention of ``q, k, v [b, heads, s, hd]`` restricted to each query's document
    (``segment_ids [b, s]``)."""
    if _flex_fits(q, dropout_p):
        return flex_document_attention(q, k, v, segment_ids, enable_gqa)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=document_causal_mask(segment_ids),
                                          dropout_p=dropout_p, enable_gqa=enable_gqa)


__all__ = ["FLEX_ON_CUDA", "document_attention", "document_causal_mask",
           "flex_document_attention"]
