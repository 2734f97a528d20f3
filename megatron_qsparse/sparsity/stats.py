"""Density bookkeeping: how many input features every sparse projection actually kept.

Each :class:`~megatron_qsparse.sparsity.sparsifier.Sparsifier` owns a :class:`DensityStats` (attribute
``density_stats``) that adds up ``count_nonzero`` of its outputs while recording is on (the compiled
CPU kernels hand over the count they computed while writing the output, so recording costs nothing
there). Counts stay on the device (no host sync in the forward pass); :func:`collect_density` reads
them out.

Recording is on by default; turn it off for evaluation with ``with recording(model, False): ...``.
"""

from __future__ import annotations

import contextlib
from typing import Iterator

import torch
from torch import nn


class DensityStats:
    """Running ``nonzero`` / ``total`` counts of one sparsifier's outputs since the last reset.

    Both counts become 0-dim int64 tensors on the outputs' device at the first record and are
    then added to and zeroed in place, so a step never reads them on the host and a compiled
    block sees the same kind of value every step (a Python int bumped in the forward pass would
    be a new constant each time: one recompilation per step).
    """

    def __init__(self) -> None:
        self.enabled = True
        self.nonzero: torch.Tensor | int = 0
        self.total: torch.Tensor | int = 0

    def reset(self) -> None:
        """Forget everything recorded so far (in place, outside the forward pass)."""
        if isinstance(self.total, torch.Tensor):
            self.nonzero.zero_()
            self.total.zero_()
        else:
            self.nonzero, self.total = 0, 0

    def record(self, y: torch.Tensor) -> None:
        """Add the nonzero count of ``y`` (one ``count_nonzero``, no host sync)."""
        if self.enabled:
            with torch.no_grad():
                self.add(torch.count_nonzero(y), y.numel())

    def add(self, nonzero: torch.Tensor | int, total: int) -> None:
        """Add an already computed ``nonzero`` count (a device tensor) out of ``total`` entries."""
        if not self.enabled:
            return
        nz = torch.as_tensor(nonzero, dtype=torch.int64)
        if not isinstance(self.total, torch.Tensor):  # the first record: counters on its device
            self.nonzero = torch.zeros((), dtype=torch.int64, device=nz.device) + self.nonzero
            self.total = torch.zeros((), dtype=torch.int64, device=nz.device) + self.total
        self.nonzero = self.nonzero + nz
        self.total = self.total + total

    def density(self) -> float | None:
        """Fraction of nonzero entries recorded, or None if nothing was recorded (reads the
        counts on the host: call it on log steps)."""
        total = int(self.total)
        return float(self.nonzero) / total if total else None


def _stats(model: nn.Module) -> Iterator[tuple[str, int, DensityStats]]:
    for m in model.modules():
        st = getattr(m, "density_stats", None)
        if isinstance(st, DensityStats):
            yield m.kind, m.layer, st


def set_recording(model: nn.Module, on: bool) -> None:
    """Turn density recording on or off for every sparsifier of ``model``."""
    for _, _, st in _stats(model):
        st.enabled = bool(on)


@contextlib.contextmanager
def recording(model: nn.Module, on: bool = True):
    """Context manager: record densities (``on=True``) or not inside the block, then restore."""
    prev = [(st, st.enabled) for _, _, st in _stats(model)]
    set_recording(model, on)
    try:
        yield
    finally:
        for st, was in prev:
            st.enabled = was


def reset_density(model: nn.Module) -> None:
    """Zero the counts of every sparsifier of ``model``."""
    for _, _, st in _stats(model):
        st.reset()


def collect_density(model: nn.Module, group=None) -> dict[str, float]:
    """Measured density since the last reset: ``{"kind/<kind>": d, "layer<i>/<kind>": d}``.

    Per-kind values pool the counts of all layers (token-weighted); layers are numbered from 0.
    Sparsifiers sharing a (kind, layer), the experts of an MoE layer, are pooled the same way.
    Sparsifiers that recorded nothing (recording off) are left out. ``group``: a process group
    whose members hold different layers (the stages of a pipeline); their counts are gathered so
    every member returns the density of the whole model (all members must call this).
    """
    counts: dict = {}
    for kind, layer, st in _stats(model):  # the experts of an MoE layer pool into one entry
        st_total = int(st.total)
        if st_total:
            nz, total = counts.get((kind, layer), (0.0, 0))
            counts[(kind, layer)] = (nz + float(st.nonzero), total + st_total)
    if group is not None and torch.distributed.get_world_size(group) > 1:
        gathered = [None] * torch.distributed.get_world_size(group)
        torch.distributed.all_gather_object(gathered, counts, group=group)
        counts = {k: v for part in gathered for k, v in part.items()}
    per_kind: dict[str, list] = {}
    out: dict[str, float] = {}
    for (kind, layer), (nz, total) in counts.items():
        out[f"layer{layer}/{kind}"] = nz / total
        acc = per_kind.setdefault(kind, [0.0, 0])
        acc[0] += nz
        acc[1] += total
    kinds = {f"kind/{k}": nz / tot for k, (nz, tot) in per_kind.items()}
    return {**kinds, **out}
