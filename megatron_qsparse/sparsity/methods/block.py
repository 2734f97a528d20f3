"""Block N:M (``--qsparse-mode block --qsparse-block N:M``): in every group of ``M`` consecutive
features keep the ``N`` largest ``|x|`` (ties toward the lower index).

A fixed pattern every token shares in shape, good for batch kernels (2:4 semi-structured). Under
tensor parallelism the groups never straddle two ranks when ``M`` divides the local width
(checked with the config), so the local mask is the global one: nothing to agree.
"""

from __future__ import annotations

import torch

from megatron_qsparse.config import flag_error
from megatron_qsparse.sparsity.masks import block_mask
from megatron_qsparse.sparsity.methods.base import SparsityMethod, register
from megatron_qsparse.sparsity.ops import block_sparsify_op
from megatron_qsparse.sparsity.ste import apply_mask
from megatron_qsparse.sparsity.stats import DensityStats


def block_sparsify(x: torch.Tensor, n: int, m: int, *, ste: bool = True,
                   stats: DensityStats | None = None, use_kernel: bool = True) -> torch.Tensor:
    """Block N:M sparsification of ``x``: ``apply_mask(x, block_mask(x, n, m), ste=ste)``.

    Runs the ``qsparse::block_sparsify`` op (``ops.py``; bit-identical results), or with
    ``use_kernel=False`` the reference mask; the nonzero count of the output is added to
    ``stats`` if given.
    """
    if x.shape[-1] % m:
        block_mask(x, n, m)  # raises the explanatory error
    if not use_kernel:
        y = apply_mask(x, block_mask(x, n, m), ste=ste)
        if stats is not None:
            stats.record(y)
        return y
    y, _, nonzero = block_sparsify_op(x, n, m, not ste)
    if stats is not None:
        stats.add(nonzero, y.numel())
    return y


@register
class Block(SparsityMethod):
    """``--qsparse-mode block``: N:M per group of M consecutive features."""

    name = "block"
    help = "block N:M"

    def __init__(self, cfg, kind, layer):
        super().__init__(cfg, kind, layer)
        self.n, self.m = cfg.block_nm()

    @classmethod
    def check_config(cls, cfg, world_size):
        q, m = cfg.qsparse, cfg.model
        parts = q.block.split(":")
        ok = len(parts) == 2 and all(s.strip().isdigit() for s in parts)
        if not ok or not 0 < int(parts[0]) <= int(parts[1]):
            raise flag_error("qsparse", "block",
                             f"{q.block!r} is not an N:M pattern with 0 < N <= M",
                             "write it as e.g. 2:4")
        tp = cfg.parallel.tensor_model_parallel_size
        if tp > 1:
            m_group = q.block_nm()[1]
            widths = {"attention output": m.num_attention_heads * m.resolved_kv_channels() // tp,
                      "FFN down": m.resolved_ffn_hidden_size() // tp}
            for what, width in widths.items():
                if width % m_group:
                    raise flag_error("qsparse", "block",
                                     f"the {what} projection's input is split into slices of "
                                     f"{width} features under --tensor-model-parallel-size {tp}, "
                                     f"not divisible by M={m_group}",
                                     "pick an M that divides every slice or a smaller TP size")

    @classmethod
    def describe(cls, q) -> str:
        return f"block {q.block}" + (" int8" if q.quantize_activations else "")

    @classmethod
    def summary(cls, q) -> dict:
        return {**super().summary(q), "qsparse_block": q.block}

    def sparsify(self, x, sp, stats):
        return block_sparsify(x, self.n, self.m, ste=sp.ste, stats=stats)

    def decode_step_op(self, sp, d):
        if d % self.m:
            return f"--qsparse-block {self.n}:{self.m} on {d} inputs"
        return {"op": "block", "n": self.n, "m": self.m}

    def sparsify_sharded(self, x, sp, row):
        if x.shape[-1] % self.m:
            raise ValueError(f"--qsparse-block {self.n}:{self.m}: the {self.kind} projection's "
                             f"input is split into {row.size} slices of {x.shape[-1]} features, "
                             f"not divisible by M={self.m}; pick an M that divides every slice "
                             "or a smaller tensor-parallel size")
        return apply_mask(x, block_mask(x, self.n, self.m), ste=sp.ste)

    def extra_repr(self, sp):
        return f"block={self.n}:{self.m}, ste={sp.ste}"
