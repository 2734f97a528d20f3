"""Top-K (the Q-Sparse default): keep the ``K = d - floor(S·d)`` largest ``|x|`` of every token.

Ties are broken toward the lower feature index, so exactly K survive and the mask never depends on
the batch layout or on how a row is split over tensor-parallel ranks. Training uses the STE
(``ste.py``); optionally the kept entries are rescaled to the dense L2 norm (``--qsparse-rescale
l2``). Two implementations give bit-identical results: the mask below (:func:`topk_mask`, the
reference) and, for CPU tensors, the compiled kernel of ``kernels.py`` that selects and writes the
sparse output in one pass.

**Row-parallel input** (:func:`global_topk_mask`, one collective). Let ``K`` be kept out of ``d``,
``c = min(K, d - K + 1)`` (select the smaller side, as ``topk_mask`` does) and ``c_r = min(c,
d/t)``. Every rank sends the ``c_r`` largest (``K ≤ d-K+1``) or smallest ``|x|`` of its slice per
token: ``[tokens, c_r]`` values. Every element of the global top-K (bottom-(d-K+1)) multiset is
among its rank's candidates, so the ``K``-th largest (``(d-K+1)``-th smallest) candidate is the
global threshold ``θ``. Ties at ``θ`` go to the lowest global indices:

* top side: ``G = #{cand > θ}`` (all such elements are candidates), ``room = K - G``; rank ``r``
  keeps its ``j``-th local ``== θ`` entry while ``E_<r + j ≤ room``, with ``E_<r`` the ``== θ``
  candidates of the lower ranks. A rank whose ties were cut off by the candidate limit already
  has ``≥ room`` of them among its candidates, so the decision is unchanged.
* bottom side, mirrored: ``D = d - K - #{cand < θ}`` ties are dropped, from the highest global
  index down, counting ``E_>r`` over the higher ranks.

Rows where exactly ``K`` entries are ``≥ θ`` (every row of tie-free float data) skip the tie step.
When ``K`` or ``d-K+1`` exceeds ``d/t`` a rank cannot rule out any of its entries, and its
candidates are its whole slice. Per row-parallel layer and token this moves ``t·c_r`` values (one
all-gather) against the ``2·(t-1)/t·h`` of the layer's output all-reduce (``bench/bench_tp.py``).
The L2 rescale agrees the two norms of the row with one all-reduce.
"""

from __future__ import annotations

import math

import torch

from megatron_qsparse.sparsity.masks import kth_largest, topk_mask
from megatron_qsparse.sparsity.methods.base import RowSlices, SparsityMethod, register
from megatron_qsparse.sparsity import ops
from megatron_qsparse.sparsity.ops import int8_topk_sparsify_op, topk_sparsify_op
from megatron_qsparse.sparsity.ste import apply_mask, check_rescale, l2_scale, quantize_int8
from megatron_qsparse.sparsity.stats import DensityStats


def keep_count(d: int, ratio: float) -> int:
    """Number of features Top-K keeps out of ``d`` at sparsity ``ratio``: ``d - floor(ratio·d)``.

    ``ratio·d`` is floored with a 1e-9 tolerance so that products that are integers in decimal but
    fall just below in binary floating point (``0.29 * 100 == 28.999999999999996``, or a warm-up
    scaled ratio such as ``0.4 * (1/3) * 30``) floor to the intended integer. At least one feature
    is always kept.
    """
    if not 0.0 <= ratio <= 1.0:
        raise ValueError(f"sparsity ratio {ratio} is outside [0, 1]")
    return max(1, d - int(math.floor(ratio * d + 1e-9)))


def topk_sparsify(x: torch.Tensor, k: int | torch.Tensor, *, ste: bool = True,
                  rescale: str = "none", stats: DensityStats | None = None,
                  use_kernel: bool = True, quantize: bool = False) -> torch.Tensor:
    """Top-K sparsification of ``x`` (last dim): ``apply_mask(x, topk_mask(x, k), ...)``.

    ``k``: an int, or a 0-dim int64 tensor on ``x``'s device (what compiled steps pass: K is
    data). Runs the ``qsparse::topk_sparsify`` op (``ops.py``: the compiled CPU kernel, Triton on
    CUDA, else the reference mask), or with ``use_kernel=False`` the reference mask directly;
    outputs and gradients are bit-identical either way. ``quantize``: per-token int8 fake
    quantization first (``--qsparse-quantize-activations``; one fused op). The nonzero count of
    the output is added to ``stats`` if given (as a device tensor).
    """
    check_rescale(rescale)
    d = x.shape[-1]
    if quantize and (rescale != "none" or not use_kernel or (isinstance(k, int) and k >= d)):
        x, quantize = quantize_int8(x), False  # the unfused order: quantize, then select
    if isinstance(k, int) and k >= d:
        if stats is not None:
            stats.record(x)
        return x
    if not use_kernel:
        y = apply_mask(x, topk_mask(x, k), ste=ste, rescale=rescale)
        if stats is not None:
            stats.record(y)
        return y
    kt = k if isinstance(k, torch.Tensor) else torch.tensor(k, dtype=torch.int64)
    if quantize:  # fused on CUDA; on CPU the quantization, then the kernel
        y, _, nonzero = int8_topk_sparsify_op(x, kt, 1e-5, not ste)
    else:
        y, _, nonzero = topk_sparsify_op(x, kt, not ste)
    if rescale == "l2":
        y = y * l2_scale(x, y)
        nonzero = None
    if stats is not None:
        stats.add(torch.count_nonzero(y) if nonzero is None else nonzero, y.numel())
    return y


# ---------------------------------------------------------------------------------------------
# the row-parallel form


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
    fast = ops.topk_candidates(a, c, largest)  # Triton on CUDA
    if fast is not None:
        return fast
    if 2 * c <= d:
        return a.topk(c, dim=-1, largest=largest, sorted=False).values
    # cheaper to find the d - c values left out, then drop them
    out = a.topk(d - c, dim=-1, largest=not largest, sorted=False).indices
    keep = torch.ones_like(a, dtype=torch.bool).scatter_(-1, out, False)
    return a[keep].view(a.shape[0], c)


def global_topk_mask(x: torch.Tensor, k: int, row: RowSlices) -> torch.Tensor:
    """This rank's slice of ``topk_mask(full_x, k)``, where ``full_x`` concatenates the ranks'
    ``x`` along the last dim in rank order. Boolean, shaped like ``x``. Every rank of ``row`` must
    call it with the same leading shape and ``k``."""
    t, r = row.size, row.rank
    d_l = x.shape[-1]
    d = d_l * t
    if k >= d:
        return torch.ones_like(x, dtype=torch.bool)
    a = x.detach().abs().reshape(-1, d_l)
    top = k <= d - k + 1
    c = candidate_count(d, k, t)
    every = row.all_gather(_extreme(a, c, largest=top))  # [t, n, c]
    pool = every.permute(1, 0, 2).reshape(a.shape[0], t * c)
    # the K-th largest of the row: of the pool when it holds the top side, else the (d-K+1)-th
    # smallest, i.e. the (t·c - d + K)-th largest of the pool
    thr = kth_largest(pool, k if top else t * c - d + k)  # [n, 1]
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
    # branch-free (no host read of which rows tie): the tie rule of every row, used where needed
    fixed = _resolve_ties(a, thr, every, k, d, r, top)
    mask = torch.where(exact.unsqueeze(-1), mask, fixed)
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


# ---------------------------------------------------------------------------------------------
# the method


@register
class TopK(SparsityMethod):
    """``--qsparse-mode topk``: exact per-token Top-K at the projection's ratio (warm-up scaled)."""

    name = "topk"
    help = "per-token top-K by |x|"
    uses_ratio = True
    rescalable = True
    fuses_int8 = True

    def __init__(self, cfg, kind, layer):
        super().__init__(cfg, kind, layer)
        self.ratio = cfg.ratio_for(kind)

    @classmethod
    def describe(cls, q) -> str:
        over = [f"{k}={getattr(q, f'{k}_ratio')}" for k in ("qkv", "o", "gate_up", "down")
                if getattr(q, f"{k}_ratio") is not None]
        return (f"topk S={q.ratio}" + (f" ({', '.join(over)})" if over else "")
                + (" int8" if q.quantize_activations else "")
                + (f" rescale={q.rescale}" if q.rescale != "none" else ""))

    def keep(self, sp, d: int) -> int:
        return keep_count(d, self.ratio * sp.ratio_scale)

    def fixed_keep(self, sp, d: int) -> int:
        return self.keep(sp, d)

    def sparsify(self, x, sp, stats):
        d = x.shape[-1]
        # the K of the bound width lives in a device buffer (set with the warm-up scale)
        k = sp.keep_k if sp.width == d else self.keep(sp, d)
        return topk_sparsify(x, k, ste=sp.ste, rescale=sp.rescale, stats=stats,
                             quantize=sp.quantize)

    def sparsify_sharded(self, x, sp, row):
        d = x.shape[-1] * row.size
        k = self.keep(sp, d)
        if k >= d:
            return x
        sums = (lambda t: row.all_reduce(t, "sum")) if sp.rescale == "l2" else None
        return apply_mask(x, global_topk_mask(x, k, row), ste=sp.ste, rescale=sp.rescale,
                          sums=sums)

    def decode_keep(self, sp, d):
        if sp.quantize:
            return "int8 quantized Top-K"
        if sp.rescale != "none":
            return f"Top-K with --qsparse-rescale {sp.rescale}"
        return self.keep(sp, d)

    def decode_step_op(self, sp, d):
        k = self.keep(sp, d)
        if k >= d:  # topk_sparsify passes x through unchanged (no rescale either)
            return {"op": "none"}
        return {"op": "topk", "k": k, "rescale": sp.rescale == "l2"}

    def extra_repr(self, sp):
        return f"ratio={self.ratio}, ste={sp.ste}, rescale={sp.rescale}"

