"""The sparsifier of a row-parallel input, whose features are split across the TP ranks.

Each rank holds a contiguous slice ``[r·d/t, (r+1)·d/t)`` of every token's ``d`` features. The
result must be what :class:`~megatron_qsparse.sparsity.Sparsifier` gives on the whole row, element
for element, so the row-wide quantities are agreed across the TP group with small collectives and
everything else calls the one implementation in :mod:`megatron_qsparse.sparsity`:

* **Top-K** (:func:`global_topk_mask`): the threshold of the unsplit row, ties broken toward the
  lower *global* feature index — one all-gather of each rank's local candidates (below).
* **int8** (``--qsparse-quantize-activations``, BitNet activations): ``γ = max|x|`` of the whole
  row (all-reduce MAX of one value per token).
* **L2 rescale**: the dense and kept norms of the whole row (all-reduce SUM, two values per token).
* **Block N:M**: groups of ``M`` never straddle two ranks when ``M`` divides the local width, so
  the local :func:`~megatron_qsparse.sparsity.block_mask` is the global one.
* **ReLU / none**: elementwise, nothing to agree.
* **Density**: the kept count of the whole row (all-reduce SUM of one number, only while the
  sparsifier records).

Global Top-K in one collective. Let ``K`` be kept out of ``d``, ``c = min(K, d - K + 1)``
(select the smaller side, as ``topk_mask`` does) and ``c_r = min(c, d/t)``. Every rank sends the
``c_r`` largest (``K ≤ d-K+1``) or smallest ``|x|`` of its slice per token: ``[tokens, c_r]``
values. Every element of the global top-K (bottom-(d-K+1)) multiset is among its rank's
candidates, so the ``K``-th largest (``(d-K+1)``-th smallest) candidate is the global threshold
``θ``. Ties at ``θ`` go to the lowest global indices:

* top side: ``G = #{cand > θ}`` (all such elements are candidates), ``room = K - G``; rank ``r``
  keeps its ``j``-th local ``== θ`` entry while ``E_<r + j ≤ room``, with ``E_<r`` the ``== θ``
  candidates of the lower ranks. A rank whose ties were cut off by the candidate limit already
  has ``≥ room`` of them among its candidates, so the decision is unchanged.
* bottom side, mirrored: ``D = d - K - #{cand < θ}`` ties are dropped, from the highest global
  index down, counting ``E_>r`` over the higher ranks.

Rows where exactly ``K`` entries are ``≥ θ`` (every row of tie-free float data) skip the tie step:
the mask is ``|x| ≥ θ``. No second collective is needed: the counts come from the gathered
candidates. When ``K`` or ``d-K+1`` exceeds ``d/t`` (e.g. S = 0.4 at TP ≥ 3) a rank cannot rule
out any of its entries, and its candidates are its whole slice.

Communication per row-parallel layer and token: ``t·c_r`` values received (``(t-1)·c_r`` from
the others) in one all-gather, vs the ``2·(t-1)/t·h`` values a ring all-reduce of the layer's
``h`` outputs moves. ``bench/bench_tp.py`` measures both.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F

from megatron_qsparse.parallel.mappings import all_gather_rows, all_reduce
from megatron_qsparse.parallel.state import ParallelState
from megatron_qsparse.sparsity import Sparsifier, apply_mask, block_mask, quantize_int8


def candidate_count(d: int, k: int, tp: int) -> int:
    """Values per token each rank contributes to the global Top-K of ``k`` out of ``d``."""
    if k >= d:
        return 0
    return min(k, d - k + 1, d // tp)


def _extreme(a: torch.Tensor, c: int, largest: bool) -> torch.Tensor:
    """The ``c`` largest (smallest) values of every row of ``a``, unordered, ``[rows, c]``."""
    d = a.shape[-1]
    if c == d:
        return a
    if 2 * c <= d:
        return a.topk(c, dim=-1, largest=largest, sorted=False).values
    # cheaper to find the d - c values left out, then drop them
    out = a.topk(d - c, dim=-1, largest=not largest, sorted=False).indices
    keep = torch.ones_like(a, dtype=torch.bool).scatter_(-1, out, False)
    return a[keep].view(a.shape[0], c)


def _kth_largest(v: torch.Tensor, k: int) -> torch.Tensor:
    """``[rows, 1]``: the ``k``-th largest value of every row (selecting the smaller side)."""
    p = v.shape[-1]
    if k <= p - k + 1:
        return v.topk(k, dim=-1, sorted=False).values.amin(-1, keepdim=True)
    return v.topk(p - k + 1, dim=-1, largest=False, sorted=False).values.amax(-1, keepdim=True)


def global_topk_mask(x: torch.Tensor, k: int, state: ParallelState) -> torch.Tensor:
    """This rank's slice of ``topk_mask(full_x, k)``, where ``full_x`` concatenates the TP ranks'
    ``x`` along the last dim in rank order. Boolean, shaped like ``x``. All TP ranks must call it
    with the same leading shape and ``k``."""
    t, r = state.tp_size, state.tp_rank
    d_l = x.shape[-1]
    d = d_l * t
    if k >= d:
        return torch.ones_like(x, dtype=torch.bool)
    a = x.detach().abs().reshape(-1, d_l)
    top = k <= d - k + 1
    c = candidate_count(d, k, t)
    every = all_gather_rows(_extreme(a, c, largest=top), state)  # [t, n, c]
    pool = every.permute(1, 0, 2).reshape(a.shape[0], t * c)
    # the K-th largest of the row: of the pool when it holds the top side, else the (d-K+1)-th
    # smallest, i.e. the (t·c - d + K)-th largest of the pool
    thr = _kth_largest(pool, k if top else t * c - d + k)  # [n, 1]
    mask = a >= thr
    # Rows where exactly K entries are >= thr need nothing more (all of them, for float data that
    # has no ties at the threshold). Counted from the pool: on the top side the candidates hold
    # every entry > thr and the ties up to the candidate limit (a rank whose candidates are all
    # >= thr may hold more: fix that row too); on the bottom side they hold every entry < thr.
    ge = (every >= thr.unsqueeze(0)).sum(-1, dtype=torch.int64)  # [t, n]
    if top:
        exact = (ge.sum(0) == k) & ((ge < c) | (c == d_l)).all(0)
    else:
        exact = ge.sum(0) == t * c - d + k  # the d - K entries < thr are all dropped
    rows = (~exact).nonzero(as_tuple=True)[0]
    if rows.numel():
        mask[rows] = _resolve_ties(a[rows], thr[rows], every[:, rows], k, d, r, top)
    return mask.view(x.shape)


def _resolve_ties(a: torch.Tensor, thr: torch.Tensor, every: torch.Tensor, k: int, d: int,
                  r: int, top: bool) -> torch.Tensor:
    """The mask of rows with ties at ``thr``: entries > thr, and the ties with the lowest global
    indices (see the module docstring for why the candidate counts decide it exactly)."""
    ties = (every == thr.unsqueeze(0)).sum(-1, dtype=torch.int64)  # [t, n] candidates == thr
    eq = a == thr
    if top:
        room = k - (every > thr.unsqueeze(0)).sum((0, 2), dtype=torch.int64).unsqueeze(-1)
        before = ties[:r].sum(0).unsqueeze(-1)
        keep_eq = eq & (before + eq.cumsum(-1, dtype=torch.int64) <= room)
    else:
        below = (every < thr.unsqueeze(0)).sum((0, 2), dtype=torch.int64).unsqueeze(-1)
        drop = d - k - below  # ties to drop, from the highest global index down
        after = ties[r + 1:].sum(0).unsqueeze(-1)
        from_right = eq.flip(-1).cumsum(-1, dtype=torch.int64).flip(-1)
        keep_eq = eq & (after + from_right > drop)
    return (a > thr) | keep_eq


def quantize_int8_sharded(x: torch.Tensor, state: ParallelState, eps: float = 1e-5
                          ) -> torch.Tensor:
    """``quantize_int8`` of the whole row, on this rank's slice: ``γ = max|x|`` is agreed with an
    all-reduce MAX, then the one implementation runs on ``[x, γ]`` (the extra column makes its
    ``γ`` the row's) and the column is dropped. Same values, bit for bit, and the same STE.

    (With a ``gamma=`` argument on ``sparsity.topk.quantize_int8`` the extra column would go.)
    """
    if state.tp_size == 1:
        return quantize_int8(x, eps)
    with torch.no_grad():
        gamma = x.detach().float().abs().amax(-1, keepdim=True)
        all_reduce(gamma, state, op=dist.ReduceOp.MAX)
    q = quantize_int8(torch.cat([x, gamma.to(x.dtype)], dim=-1), eps)
    return q[..., :-1]


def _l2_scale_sharded(x: torch.Tensor, y: torch.Tensor, state: ParallelState) -> torch.Tensor:
    """Per-token ``‖x‖ / ‖y‖`` over the whole row (1 where ``y`` is all zero), in ``x.dtype``."""
    with torch.no_grad():
        sq = torch.stack([x.detach().float().square().sum(-1), y.detach().float().square().sum(-1)])
        all_reduce(sq, state)
        dense, kept = sq.sqrt().unsqueeze(-1).unbind(0)
        return torch.where(kept > 0, dense / kept.clamp_min(1e-30), 1.0).to(x.dtype)


def _record_density(sp: Sparsifier, y: torch.Tensor, state: ParallelState) -> None:
    st = sp.density_stats
    if not st.enabled:
        return
    with torch.no_grad():
        nz = torch.count_nonzero(y).reshape(1)
        all_reduce(nz, state)
    st.nonzero = st.nonzero + nz[0]
    st.total += y.numel() * state.tp_size


def sparsify_sharded(sp: Sparsifier, x: torch.Tensor, state: ParallelState) -> torch.Tensor:
    """``sp(full_x)`` restricted to this rank's slice ``x`` (see the module docstring).

    At TP = 1 this is exactly ``sp(x)``. The sparsifier's settings (mode, ratio and warm-up scale,
    STE, rescale, int8, N:M) and its density statistics are used as they are.
    """
    if state.tp_size == 1:
        return sp(x)
    t, d_l = state.tp_size, x.shape[-1]
    d = d_l * t
    if sp.quantize:
        x = quantize_int8_sharded(x, state)
    if sp.mode == "topk":
        k = sp.keep(d)
        if k >= d:
            y = x
        else:
            y = apply_mask(x, global_topk_mask(x, k, state), ste=sp.ste)
            if sp.rescale == "l2":
                y = y * _l2_scale_sharded(x, y, state)
    elif sp.mode == "block":
        n, m = sp.block_nm
        if d_l % m:
            raise ValueError(f"--qsparse-block {n}:{m}: the {sp.kind} projection's input is split "
                             f"into {t} slices of {d_l} features, not divisible by M={m}; pick "
                             "an M that divides every slice or a smaller tensor-parallel size")
        y = apply_mask(x, block_mask(x, n, m), ste=sp.ste)
    elif sp.mode == "relu":
        y = F.relu(x)
    else:
        y = x
    _record_density(sp, y, state)
    return y


__all__ = ["candidate_count", "global_topk_mask", "quantize_int8_sharded", "sparsify_sharded"]
