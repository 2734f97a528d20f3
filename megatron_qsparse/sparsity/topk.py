"""Q-Sparse sparsifiers: what the input of every linear projection goes through before its matmul.

For a projection ``Y = X Wᵀ`` with ``d`` input features (last dimension), per token:

* ``topk``  keep the ``K = d - floor(S·d)`` entries of largest ``|x|``, zero the rest; ties go to
  the lower feature index, so exactly K survive and the mask never depends on the batch layout.
* ``block`` keep the ``N`` largest ``|x|`` in every group of ``M`` consecutive features (N:M).
* ``relu``  ``max(x, 0)`` (ablation; its natural gradient).
* ``none``  identity.

Training uses the straight-through estimator (STE): the backward pass treats the mask as the
identity. ``ste=False`` (``--no-ste``) lets only the kept positions receive gradient. Optionally the
input is int8 fake-quantized first (per-token absmax, STE) and the kept entries rescaled to the
dense L2 norm. See DESIGN.md, "The method, precisely".

Two implementations give bit-identical results: the masks below (:func:`topk_mask`,
:func:`block_mask`, the reference) and, for CPU tensors, the compiled kernels of ``kernels.py``,
which select and write the sparse output in one pass (about 5-10x faster). :func:`topk_sparsify` and
:func:`block_sparsify` pick the kernel when it is available and fall back to the masks otherwise.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from megatron_qsparse.config import QSparseConfig
from megatron_qsparse.sparsity import kernels
from megatron_qsparse.sparsity.stats import DensityStats

# ---------------------------------------------------------------------------------------------
# mask selection


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


def topk_mask(x: torch.Tensor, k: int) -> torch.Tensor:
    """Boolean mask keeping the ``k`` largest ``|x|`` along the last dim, exactly ``k`` per row.

    Ties at the threshold are broken toward the lower feature index. The threshold is the k-th
    largest ``|x|``, found with a partial selection (``torch.topk`` of the smaller side, no full
    sort); rows where ties at the threshold would keep more than ``k`` entries (rare for float
    data, common after quantization or with many exact zeros) are then fixed with a cumulative
    count over the tied positions.
    """
    d = x.shape[-1]
    if k >= d:
        return torch.ones_like(x, dtype=torch.bool)
    a = x.detach().abs().reshape(-1, d)
    if k <= d - k + 1:
        thr = a.topk(k, dim=-1, sorted=False).values.amin(-1, keepdim=True)
    else:  # select the smaller side: the (d-k+1) smallest, whose max is the k-th largest
        thr = a.topk(d - k + 1, dim=-1, largest=False, sorted=False).values.amax(-1, keepdim=True)
    mask = a >= thr
    tied = (mask.sum(-1, dtype=torch.int32) != k).nonzero(as_tuple=True)
    if tied[0].numel():
        at, tt = a[tied], thr[tied]
        gt, eq = at > tt, at == tt
        room = k - gt.sum(-1, keepdim=True, dtype=torch.int32)
        mask[tied] = gt | (eq & (eq.cumsum(-1, dtype=torch.int32) <= room))
    return mask.view(x.shape)


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


# ---------------------------------------------------------------------------------------------
# straight-through functions


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


def _fake_quant_int8(x: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    xf = x.float()
    gamma = xf.abs().amax(-1, keepdim=True) + eps
    return ((xf * (127.0 / gamma)).round_().clamp_(-128, 127) * (gamma / 127.0)).to(x.dtype)


def quantize_int8(x: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """Per-token absmax int8 fake quantization with STE.

    ``γ = max|x|`` over the last dim; ``Q(x) = clamp(round(127·x/(γ+ε)), -128, 127)·(γ+ε)/127``.
    Computed in fp32, returned in ``x.dtype``; the gradient passes through unchanged.
    """
    return straight_through(x, lambda t: _fake_quant_int8(t, eps))


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


class _KernelSparsify(torch.autograd.Function):
    """``y = select(x) (· scale)`` where ``select`` is a compiled kernel returning
    ``(y, mask | None, nonzero)``; same backward as :class:`_ApplyMask`.

    With ``ste`` nothing is saved (only the per-token scale when rescaling) and no mask is even
    built; without ``ste`` the kernel also writes the bool mask, which is saved. The nonzero count
    of ``y`` is added to ``stats`` (a :class:`DensityStats` or None) at no extra cost.
    """

    @staticmethod
    def forward(ctx, x, select, ste, rescale, stats):
        want_mask = not ste and ctx.needs_input_grad[0]
        y, mask, nonzero = select(x, want_mask)
        scale = None
        if rescale == "l2":
            scale = _l2_scale(x, y)
            y.mul_(scale)
            nonzero = torch.count_nonzero(y) if stats is not None else 0
        if stats is not None:
            stats.add(nonzero, y.numel())
        ctx.ste, ctx.has_scale = ste, scale is not None
        ctx.save_for_backward(*([mask] if want_mask else []), *([] if scale is None else [scale]))
        return y

    @staticmethod
    def backward(ctx, grad):
        return _mask_backward(ctx, grad), None, None, None, None


def _l2_scale(x: torch.Tensor, sparse: torch.Tensor) -> torch.Tensor:
    """Per-token ``‖x‖ / ‖sparse‖`` in fp32 (1 where ``sparse`` is all zero), in ``x.dtype``."""
    with torch.no_grad():
        dense = torch.linalg.vector_norm(x.detach().float(), dim=-1, keepdim=True)
        kept = torch.linalg.vector_norm(sparse.detach().float(), dim=-1, keepdim=True)
        return torch.where(kept > 0, dense / kept.clamp_min(1e-30), 1.0).to(x.dtype)


def _check_rescale(rescale: str) -> None:
    if rescale not in ("none", "l2"):
        raise ValueError(f"--qsparse-rescale: unknown rescale {rescale!r}; use none or l2")


def apply_mask(x: torch.Tensor, mask: torch.Tensor, *, ste: bool = True,
               rescale: str = "none") -> torch.Tensor:
    """Zero ``x`` outside ``mask``; STE or masked gradient; optional ``"l2"`` rescale.

    The L2 rescale multiplies the kept entries by ``‖x‖ / ‖x ⊙ mask‖`` per token (1 for an all-zero
    row); the factor is a constant for autograd, so the STE gradient is ``grad · factor``.
    """
    _check_rescale(rescale)
    scale = _l2_scale(x, x.detach() * mask) if rescale == "l2" else None
    return _ApplyMask.apply(x, mask, scale, ste)


def topk_sparsify(x: torch.Tensor, k: int, *, ste: bool = True, rescale: str = "none",
                  stats: DensityStats | None = None, use_kernel: bool = True) -> torch.Tensor:
    """Top-K sparsification of ``x`` (last dim): ``apply_mask(x, topk_mask(x, k), ...)``.

    Runs the compiled CPU kernel when it supports ``x`` (see ``kernels.py``), else, or with
    ``use_kernel=False``, the reference masks; outputs and gradients are bit-identical either way.
    The nonzero count of the output is added to ``stats`` if given.
    """
    _check_rescale(rescale)
    d = x.shape[-1]
    if k >= d:
        if stats is not None:
            stats.record(x)
        return x
    if use_kernel and kernels.supports(x):
        return _KernelSparsify.apply(x, lambda t, m: kernels.topk_sparsify(t, k, m), ste,
                                     rescale, stats)
    y = apply_mask(x, topk_mask(x, k), ste=ste, rescale=rescale)
    if stats is not None:
        stats.record(y)
    return y


def block_sparsify(x: torch.Tensor, n: int, m: int, *, ste: bool = True,
                   stats: DensityStats | None = None, use_kernel: bool = True) -> torch.Tensor:
    """Block N:M sparsification of ``x``: ``apply_mask(x, block_mask(x, n, m), ste=ste)``.

    Kernel selection, identical results and density recording as :func:`topk_sparsify`.
    """
    if x.shape[-1] % m:
        block_mask(x, n, m)  # raises the explanatory error
    if use_kernel and m <= kernels.MAX_BLOCK_M and kernels.supports(x):
        return _KernelSparsify.apply(x, lambda t, w: kernels.block_sparsify(t, n, m, w), ste,
                                     "none", stats)
    y = apply_mask(x, block_mask(x, n, m), ste=ste)
    if stats is not None:
        stats.record(y)
    return y


# ---------------------------------------------------------------------------------------------
# the module every linear layer holds


class Sparsifier(nn.Module):
    """The sparsifier on the input of one projection (kind ``qkv``, ``o``, ``gate_up`` or ``down``).

    ``forward(x)``: optional int8 fake quant, then the configured mode (``topk``, ``block``,
    ``relu``, ``none``). ``ratio_scale`` (default 1.0) multiplies the Top-K ratio; the training loop
    ramps it 0→1 for the sparsity warm-up through :func:`set_sparsity_scale`. The density of every
    output is recorded into ``density_stats`` while recording is on (see ``stats.py``); mode
    ``none`` returns its input unchanged (without quantization) and records its natural density,
    so a dense baseline logs the same statistics (e.g. the zeros ReLU² leaves before ``down``).
    """

    def __init__(self, cfg: QSparseConfig, kind: str, layer: int):
        super().__init__()
        self.mode, self.kind, self.layer = cfg.mode, kind, layer
        self.ratio = cfg.ratio_for(kind)  # validates the kind
        self.block_nm = cfg.block_nm() if cfg.mode == "block" else None
        self.ste, self.rescale = cfg.ste, cfg.rescale
        self.quantize = cfg.quantize_activations
        self.ratio_scale = 1.0
        self.density_stats = DensityStats()
        if self.mode not in ("topk", "block", "relu", "none"):
            raise ValueError(f"--qsparse-mode: unknown mode {self.mode!r}")

    def keep(self, d: int) -> int:
        """Features kept per token by Top-K at the current warm-up scale."""
        return keep_count(d, self.ratio * self.ratio_scale)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.quantize:
            x = quantize_int8(x)
        stats = self.density_stats if self.density_stats.enabled else None
        if self.mode == "topk":
            return topk_sparsify(x, self.keep(x.shape[-1]), ste=self.ste, rescale=self.rescale,
                                 stats=stats)
        if self.mode == "block":
            return block_sparsify(x, *self.block_nm, ste=self.ste, stats=stats)
        y = F.relu(x) if self.mode == "relu" else x
        if stats is not None:
            stats.record(y)
        return y

    def extra_repr(self) -> str:
        s = f"mode={self.mode}, kind={self.kind}, layer={self.layer}"
        if self.mode == "topk":
            s += f", ratio={self.ratio}, ste={self.ste}, rescale={self.rescale}"
        elif self.mode == "block":
            s += f", block={self.block_nm[0]}:{self.block_nm[1]}, ste={self.ste}"
        return s + (", int8" if self.quantize else "")


def build_sparsifier(cfg: QSparseConfig, kind: str, layer: int) -> Sparsifier:
    """The sparsifier for the input of projection ``kind`` in block ``layer`` (0-based)."""
    return Sparsifier(cfg, kind, layer)


def set_sparsity_scale(model: nn.Module, scale: float) -> None:
    """Set the warm-up scale (0 = dense, 1 = target ratio) of every :class:`Sparsifier`."""
    if not 0.0 <= scale <= 1.0:
        raise ValueError(f"sparsity warm-up scale {scale} is outside [0, 1]")
    for m in model.modules():
        if isinstance(m, Sparsifier):
            m.ratio_scale = float(scale)
