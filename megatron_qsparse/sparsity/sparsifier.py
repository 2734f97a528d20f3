"""The module every linear projection holds on its input: a :class:`Sparsifier`.

It holds one method object (``sparsity/methods/``, chosen by ``--qsparse-mode``) and adds what
every method shares: the optional int8 pre-quantization (``--qsparse-quantize-activations``), the
sparsity warm-up scale, the STE / rescale settings, and density recording (``stats.py``).
:meth:`Sparsifier.forward` sparsifies a whole row; :meth:`Sparsifier.forward_sharded` a
tensor-parallel slice of it, agreeing row-wide values through a
:class:`~megatron_qsparse.sparsity.methods.RowSlices`.
"""

from __future__ import annotations

import torch
from torch import nn

from megatron_qsparse.config import QSparseConfig
from megatron_qsparse.sparsity.methods import RowSlices, get_method
from megatron_qsparse.sparsity.ste import check_rescale, quantize_int8
from megatron_qsparse.sparsity.stats import DensityStats


def quantize_int8_sharded(x: torch.Tensor, row: RowSlices, eps: float = 1e-5) -> torch.Tensor:
    """``quantize_int8`` of the whole row on this rank's slice ``x``: ``γ = max|x|`` of the row is
    agreed with an all-reduce MAX (one value per token). Same values, bit for bit, and the STE."""
    if row.size == 1:
        return quantize_int8(x, eps)
    with torch.no_grad():
        gamma = x.detach().float().abs().amax(-1, keepdim=True)
        row.all_reduce(gamma, "max")
    return quantize_int8(x, eps, gamma=gamma.to(x.dtype))


class Sparsifier(nn.Module):
    """The sparsifier on the input of one projection (kind ``qkv``, ``o``, ``gate_up`` or ``down``).

    ``forward(x)``: optional int8 fake quant, then the method. ``ratio_scale`` (default 1.0)
    multiplies the ratio of ratio-based methods; the training loop ramps it 0→1 for the sparsity
    warm-up through :func:`set_sparsity_scale`. The density of every output is recorded into
    ``density_stats`` while recording is on; mode ``none`` passes its input through and records
    its natural density, so a dense baseline logs the same statistics.
    """

    def __init__(self, cfg: QSparseConfig, kind: str, layer: int):
        super().__init__()
        self.mode, self.kind, self.layer = cfg.mode, kind, layer
        self.ratio = cfg.ratio_for(kind)  # validates the kind
        check_rescale(cfg.rescale)
        self.ste, self.rescale = cfg.ste, cfg.rescale
        self.quantize = cfg.quantize_activations
        self.ratio_scale = 1.0
        self.density_stats = DensityStats()
        self.method = get_method(cfg.mode)(cfg, kind, layer)
        self.width: int | None = None  # the projection's whole input width, once bound
        # K of fixed-K methods at the current warm-up scale, on the model's device: the compiled
        # forward reads it as data (a new K every warm-up step, no recompilation)
        self.register_buffer("keep_k", torch.zeros((), dtype=torch.int64), persistent=False)

    def bind(self, width: int) -> "Sparsifier":
        """Tie this sparsifier to its projection's whole input width (the parallel layers do)."""
        self.width = int(width)
        self._update_keep()
        return self

    def _apply(self, fn, recurse=True):
        if self.keep_k.is_meta:  # built on the meta device and loaded with assign=True: the
            self.keep_k = torch.zeros((), dtype=torch.int64)  # buffer is not in state dicts
            self._update_keep()
        return super()._apply(fn, recurse)

    def _update_keep(self) -> None:
        if self.width is not None:
            k = self.method.fixed_keep(self, self.width)
            if k is not None:
                self.keep_k.fill_(k)

    def keep(self, d: int) -> int | str:
        """Inputs kept per token out of ``d`` by the fused decode paths at the current warm-up
        scale (0: every nonzero one), or why they cannot run this projection."""
        return self.method.decode_keep(self, d)

    def decode_step_op(self, d: int) -> dict | str:
        """The compiled decode step's form of this sparsifier on ``d`` inputs (see
        :meth:`~megatron_qsparse.sparsity.methods.base.SparsityMethod.decode_step_op`), with
        ``quantize``: the int8 pre-quantization that :meth:`forward` applies first."""
        op = self.method.decode_step_op(self, d)
        if isinstance(op, dict):
            op = {"k": 0, "n": 0, "m": 0, "t": 0.0, "rescale": False, **op,
                  "quantize": bool(self.quantize)}
        return op

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.quantize and not self.method.fuses_int8:
            x = quantize_int8(x)
        stats = self.density_stats if self.density_stats.enabled else None
        return self.method.sparsify(x, self, stats)

    def forward_sharded(self, x: torch.Tensor, row: RowSlices) -> torch.Tensor:
        """``forward(whole_row)`` restricted to this rank's slice ``x`` of it (same values, same
        gradients); the density recorded is the whole row's."""
        if row.size == 1:
            return self(x)
        if self.quantize:
            x = quantize_int8_sharded(x, row)
        y = self.method.sparsify_sharded(x, self, row)
        st = self.density_stats
        if st.enabled:
            with torch.no_grad():
                nz = torch.count_nonzero(y).reshape(1)
                row.all_reduce(nz, "sum")
            st.add(nz[0], y.numel() * row.size)
        return y

    def extra_repr(self) -> str:
        s = f"mode={self.mode}, kind={self.kind}, layer={self.layer}"
        detail = self.method.extra_repr(self)
        return s + (f", {detail}" if detail else "") + (", int8" if self.quantize else "")


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
            m._update_keep()
