"""Gated FFN activations ``act(gate, up)``; the result is the input of the down projection."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def relu2_glu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """Squared-ReLU GLU: ``up ⊙ ReLU(gate)²`` (Q-Sparse's default from scratch; sparse itself)."""
    return up * F.relu(gate).square()


def swiglu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """SwiGLU: ``SiLU(gate) ⊙ up`` (LLaMA/Mistral/Qwen)."""
    return F.silu(gate) * up


ACTIVATIONS = {"relu2_glu": relu2_glu, "swiglu": swiglu}
"""Activation by ``ModelConfig.ffn_type``."""
