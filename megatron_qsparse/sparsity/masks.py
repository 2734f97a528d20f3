"""The reference selection masks: what the kernels of ``ops.py`` must match bit for bit.

Shared by the sparsifier methods (``methods/topk.py``, ``methods/block.py``), their
tensor-parallel forms and the custom ops' pure-PyTorch fallback. Nothing here reads a value
back on the host.
"""

from __future__ import annotations

import torch


def topk_mask(x: torch.Tensor, k: int | torch.Tensor) -> torch.Tensor:
    """Boolean mask keeping the ``k`` largest ``|x|`` along the last dim, exactly ``k`` per row.

    Ties at the threshold are broken toward the lower feature index. The threshold is the k-th
    largest ``|x|``: with an int ``k`` from a partial selection (``torch.topk`` of the smaller
    side, no full sort), with a 0-dim tensor ``k`` (the compiled path, where K is data) from a
    sort. The tie rule is applied to every row, branch-free: entries above the threshold, then the
    tied ones in index order while room is left. Nothing is read back on the host.
    """
    d = x.shape[-1]
    if isinstance(k, int) and k >= d:
        return torch.ones_like(x, dtype=torch.bool)
    a = x.detach().abs().reshape(-1, d)
    if isinstance(k, int):
        thr = kth_largest(a, k)
    else:
        idx = (k.to(torch.int64).clamp(1, d) - 1).reshape(1, 1).expand(a.shape[0], 1)
        thr = a.sort(dim=-1, descending=True).values.gather(-1, idx)
    gt, eq = a > thr, a == thr
    room = k - gt.sum(-1, keepdim=True, dtype=torch.int32)
    mask = gt | (eq & (eq.cumsum(-1, dtype=torch.int32) <= room))
    return mask.view(x.shape)


def kth_largest(v: torch.Tensor, k: int) -> torch.Tensor:
    """``[rows, 1]``: the ``k``-th largest value of every row (selecting the smaller side)."""
    p = v.shape[-1]
    if k <= p - k + 1:
        return v.topk(k, dim=-1, sorted=False).values.amin(-1, keepdim=True)
    return v.topk(p - k + 1, dim=-1, largest=False, sorted=False).values.amax(-1, keepdim=True)


def block_mask(x: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """Boolean N:M mask: in every group of ``m`` consecutive features keep the ``n`` largest ``|x|``
    (ties toward the lower index)."""
    d = x.shape[-1]
    if d % m:
        raise ValueError(f"--qsparse-block {n}:{m}: input width {d} is not divisible by M={m}; "
                         "pick an M that divides every projection's input width")
    a = x.detach().abs().unflatten(-1, (d // m, m))
    idx = a.sort(dim=-1, descending=True, stable=True).indices[..., :n]
    mask = torch.zeros_like(a, dtype=torch.bool).scatter_(-1, idx, True)
    return mask.flatten(-2)
