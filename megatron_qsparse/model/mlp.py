"""The gated FFN of a decoder block (``[gate; up]`` fused projection, activation, down
projection); also the expert of a mixture-of-experts layer (:mod:`megatron_qsparse.model.moe`).

The gate/up weight is ``[2·ffn, hidden]`` with rows ``[gate; up]`` (the Hugging Face importer
depends on it); both projections sparsify their input (kinds ``gate_up`` and ``down``, the down
projection's input after the FFN activation).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from megatron_qsparse.config import ModelConfig
from megatron_qsparse.parallel.layers import ColumnParallelLinear, RowParallelLinear, divide
from megatron_qsparse.parallel.state import ParallelState, get_parallel_state
from megatron_qsparse.sparsity.activations import ACTIVATIONS
from megatron_qsparse.sparsity import build_sparsifier


class MLP(nn.Module):
    """Gated FFN: fused ``[gate; up]`` projection, activation by ``ffn_type``, down projection.

    ``ffn`` is this TP rank's share of the FFN width (all of it at TP = 1).
    """

    def __init__(self, cfg: ModelConfig, layer: int, parallel: ParallelState | None = None):
        super().__init__()
        qcfg = cfg.qsparse
        parallel = parallel if parallel is not None else get_parallel_state()
        ffn = cfg.resolved_ffn_hidden_size()
        self.ffn = divide(ffn, parallel.tp_size, "--ffn-hidden-size")
        self.act = ACTIVATIONS[cfg.ffn_type]
        self.gate_up = ColumnParallelLinear(
            cfg.hidden_size, 2 * ffn, bias=cfg.add_bias_linear,
            sparsifier=build_sparsifier(qcfg, "gate_up", layer),
            init_method_std=cfg.init_method_std, bitnet=qcfg.bitnet, parallel=parallel,
            output_sizes=(ffn, ffn))
        self.down = RowParallelLinear(
            ffn, cfg.hidden_size, bias=cfg.add_bias_linear,
            sparsifier=build_sparsifier(qcfg, "down", layer),
            init_method_std=cfg.init_method_std / math.sqrt(2.0 * cfg.num_layers),
            bitnet=qcfg.bitnet, parallel=parallel)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up(x).chunk(2, dim=-1)
        return self.down(self.act(gate, up))


__all__ = ["MLP"]
