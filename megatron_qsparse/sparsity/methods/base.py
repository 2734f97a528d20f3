"""What a sparsifier method is, and the registry of them (``--qsparse-mode`` is a registered name).

A method is one class, in one file of this package, registered with :func:`register`. It owns:

* the **forward** on a whole row (:meth:`SparsityMethod.sparsify`: the reference and, where it
  has one, the compiled-kernel dispatch), with the straight-through estimator of ``ste.py``;
* its **tensor-parallel form** (:meth:`SparsityMethod.sparsify_sharded`): the input of a
  row-parallel layer is split over the TP ranks, and whatever the method computes over the whole
  row (a Top-K threshold, an L2 norm) is agreed through a :class:`RowSlices`; elementwise
  methods need nothing;
* its **config checks** (:meth:`SparsityMethod.check_config`), a one-line :meth:`describe`, the
  fields it reports in summaries (:meth:`summary`);
* which **decode paths** take it (:meth:`SparsityMethod.decode_keep`: the fused Top-K GEMV and
  the compiled decode step; every method runs on the generic sparsify-then-GEMV path).

What every method shares lives in :class:`~megatron_qsparse.sparsity.sparsifier.Sparsifier`
(the module each projection holds): the int8 pre-quantization, the warm-up scale, density
recording. Nothing outside this package tests the mode's name.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, ClassVar, Protocol

import torch
from torch import nn

if TYPE_CHECKING:
    from megatron_qsparse.config import Config, QSparseConfig
    from megatron_qsparse.sparsity.stats import DensityStats

# ``sp`` arguments below are the calling ``sparsity.sparsifier.Sparsifier`` (not imported here:
# it imports this registry)


class RowSlices(Protocol):
    """The tensor-parallel group a row-parallel input is split over (``parallel/sparsify.py``).

    Rank ``rank`` of ``size`` holds features ``[rank·d/size, (rank+1)·d/size)`` of every row. The
    collectives take no part in autograd.
    """

    size: int
    rank: int

    def all_reduce(self, t: torch.Tensor, op: str = "sum") -> None:
        """In place, over the group; ``op`` is ``"sum"`` or ``"max"``."""

    def all_gather(self, t: torch.Tensor) -> torch.Tensor:
        """Every rank's ``t`` stacked in rank order: ``[size, *t.shape]``."""


class SparsityMethod:
    """Base class of a sparsifier method. One instance per projection (kind, layer)."""

    name: ClassVar[str] = ""
    #: a phrase for ``--qsparse-mode``'s help, e.g. "per-token top-K by |x|"
    help: ClassVar[str] = ""
    #: whether ``--qsparse-ratio``, the per-projection ratios and the warm-up mean anything
    uses_ratio: ClassVar[bool] = False
    #: whether ``--qsparse-rescale l2`` applies
    rescalable: ClassVar[bool] = False
    #: the identity (mode ``none``): models with it and no BitNet decode as dense models
    dense: ClassVar[bool] = False
    #: ``sparsify`` applies the int8 pre-quantization itself (``sp.quantize``), fused with the
    #: selection; otherwise the Sparsifier quantizes before calling it
    fuses_int8: ClassVar[bool] = False

    def __init__(self, cfg: "QSparseConfig", kind: str, layer: int):
        self.kind, self.layer = kind, layer

    # ---- configuration
    @classmethod
    def check_config(cls, cfg: "Config", world_size: int | None) -> None:
        """Raise :class:`~megatron_qsparse.config.ConfigError` (one line naming the flag and the
        fix) for settings this method cannot honour."""

    @classmethod
    def describe(cls, q: "QSparseConfig") -> str:
        """One line for logs and reports, e.g. ``topk S=0.4``."""
        return cls.name

    @classmethod
    def summary(cls, q: "QSparseConfig") -> dict:
        """The sparsity fields of summary JSON files (evaluation, lm-eval, training)."""
        return {"qsparse_mode": cls.name, "qsparse_ratio": q.ratio if cls.uses_ratio else None,
                "qsparse_block": None}

    # ---- forward
    def sparsify(self, x: torch.Tensor, sp: "nn.Module",
                 stats: "DensityStats | None") -> torch.Tensor:
        """The sparse ``x`` (last dim = the projection's input features). ``sp`` holds the shared
        settings (``ste``, ``rescale``, warm-up ``ratio_scale``). Record the output's nonzero
        count into ``stats`` when it is given (the kernels hand it over at no cost)."""
        raise NotImplementedError

    def sparsify_sharded(self, x: torch.Tensor, sp: "nn.Module",
                         row: RowSlices) -> torch.Tensor:
        """This rank's slice of ``sparsify(whole_row)``, element for element. The default suits
        elementwise methods; density is recorded by the caller."""
        return self.sparsify(x, sp, None)

    def fixed_keep(self, sp: "nn.Module", d: int) -> int | None:
        """The K this method keeps of ``d`` inputs at the current warm-up scale, when it keeps a
        fixed number (stored in the sparsifier's device buffer ``keep_k``), else None."""
        return None

    # ---- decoding
    def decode_keep(self, sp: "nn.Module", d: int) -> int | str:
        """For the fused Top-K GEMV and the compiled decode step: the inputs kept per token out
        of ``d`` (0: every nonzero one, i.e. no selection), or why those paths cannot run this
        projection (it then decodes by sparsify + nonzero GEMV)."""
        return f"--qsparse-mode {self.name}"

    def decode_step_op(self, sp: "nn.Module", d: int) -> dict | str:
        """For the compiled decode step (``inference/csrc/decode_step.h``): the selection it runs
        on ``d`` inputs, as ``{"op": "none" | "topk" | "block" | "relu" | "threshold", ...}``
        (``k`` for topk, ``n``/``m`` for block, ``t`` for threshold; ``rescale``: the L2 rescale
        the method applies after selecting), or why it cannot (the layer-by-layer path then runs
        the projection). The int8 pre-quantization (``sp.quantize``) is applied before it, as
        :meth:`Sparsifier.forward` does, whatever the method."""
        return f"--qsparse-mode {self.name}"

    def extra_repr(self, sp: "nn.Module") -> str:
        return ""


_REGISTRY: dict[str, type[SparsityMethod]] = {}


def register(cls: type[SparsityMethod]) -> type[SparsityMethod]:
    """Class decorator: make ``cls`` available as ``--qsparse-mode cls.name``."""
    if not cls.name or cls.name in _REGISTRY:
        raise ValueError(f"sparsifier method name {cls.name!r} is empty or taken")
    _REGISTRY[cls.name] = cls
    return cls


def method_names() -> tuple[str, ...]:
    """The registered ``--qsparse-mode`` choices, in registration order."""
    return tuple(_REGISTRY)


def get_method(name: str) -> type[SparsityMethod]:
    """The method class registered as ``name``; a one-line ``ValueError`` naming the choices."""
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ValueError(f"--qsparse-mode: unknown mode {name!r}; choose one of "
                         f"{', '.join(_REGISTRY)}") from None
