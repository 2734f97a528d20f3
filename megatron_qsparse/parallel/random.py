"""TP-aware dropout RNG (Megatron's RNG states tracker, for the CPU and the CUDA generator).

Under tensor parallelism two kinds of activations get dropout:

* replicated ones (the residual stream after a row-parallel all-reduce): every TP rank must drop
  the *same* elements, so they use the default generator, seeded identically on the TP ranks of
  one data-parallel rank;
* split ones (this rank's attention heads): each TP rank must draw *different* masks, so they use
  a second, per-TP-rank generator state, entered with ``with tracker.fork(name): ...``.

The tracker keeps named generator states; ``fork`` swaps one in for the default generator and
stores its advanced state back on exit. Its states are saved in checkpoints (``get_states``).
"""

from __future__ import annotations

import contextlib
from typing import Iterator

import torch


def _cuda() -> bool:
    return torch.cuda.is_available() and torch.cuda.is_initialized()


class RNGStatesTracker:
    """Named RNG states (CPU, plus the current CUDA device's when CUDA is in use)."""

    def __init__(self) -> None:
        self.states: dict[str, dict[str, torch.Tensor]] = {}

    def reset(self) -> None:
        self.states = {}

    def add(self, name: str, seed: int) -> None:
        """Register state ``name`` seeded with ``seed``, leaving the default generator untouched."""
        if name in self.states:
            raise ValueError(f"RNG state {name!r} already exists")
        st = {"cpu": torch.Generator().manual_seed(seed).get_state()}
        if _cuda():
            prev = torch.cuda.get_rng_state()
            torch.cuda.manual_seed(seed)
            st["cuda"] = torch.cuda.get_rng_state()
            torch.cuda.set_rng_state(prev)
        self.states[name] = st

    def get_states(self) -> dict[str, dict[str, torch.Tensor]]:
        """A copy of every state (tensors only: safe to save and to load with weights_only)."""
        return {n: {k: v.clone() for k, v in s.items()} for n, s in self.states.items()}

    def set_states(self, states: dict[str, dict[str, torch.Tensor]]) -> None:
        self.states = {n: {k: v.clone() for k, v in s.items()} for n, s in states.items()}

    @contextlib.contextmanager
    def fork(self, name: str) -> Iterator[None]:
        """Use state ``name`` as the default generator inside the block."""
        if name not in self.states:
            raise RuntimeError(f"RNG state {name!r} was never seeded; call "
                               "ParallelState.seed(seed) after building the parallel state")
        st = self.states[name]
        prev_cpu = torch.get_rng_state()
        prev_cuda = torch.cuda.get_rng_state() if "cuda" in st else None
        torch.set_rng_state(st["cpu"])
        if prev_cuda is not None:
            torch.cuda.set_rng_state(st["cuda"])
        try:
            yield
        finally:
            st["cpu"] = torch.get_rng_state()
            torch.set_rng_state(prev_cpu)
            if prev_cuda is not None:
                st["cuda"] = torch.cuda.get_rng_state()
                torch.cuda.set_rng_state(prev_cuda)


def checkpoint(fn, *args, state) -> torch.Tensor:
    """``fn(*args)`` without keeping its activations: they are recomputed in the backward pass
    (``torch.utils.checkpoint``, non-reentrant). The default generator is replayed by torch; the
    tracker's model-parallel state (``state``: the :class:`ParallelState`) is put back to what it
    was in the forward pass for the recomputation, so dropout draws the same masks twice."""
    from torch.utils.checkpoint import checkpoint as torch_checkpoint

    saved = state.rng.get_states()

    @contextlib.contextmanager
    def replay() -> Iterator[None]:
        current = state.rng.get_states()
        state.rng.set_states(saved)
        try:
            yield
        finally:
            state.rng.set_states(current)

    return torch_checkpoint(fn, *args, use_reentrant=False, preserve_rng_state=True,
                            context_fn=lambda: (contextlib.nullcontext(), replay()))
