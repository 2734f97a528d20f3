"""LLaMA-style decoder block: norms, RoPE + grouped-query attention, the pre-norm block.

The block's FFN is the gated :class:`~megatron_qsparse.model.mlp.MLP` (or, in the blocks
``--moe-layer-freq`` picks, a :class:`~megatron_qsparse.model.moe.MoELayer` of such MLPs).

Every projection is a :mod:`megatron_qsparse.parallel.layers` linear whose input is sparsified
(kinds ``qkv``, ``o``, ``gate_up``, ``down``; the down projection's input is sparsified *after* the
FFN activation).

Fused weight layouts (the Hugging Face importer depends on them):

* QKV ``[(nq + 2·nkv)·hd, hidden]``: rows ``[all q heads; all k heads; all v heads]``, each head's
  ``hd`` rows contiguous, heads in order — i.e. ``cat([q_proj, k_proj, v_proj], dim=0)`` of HF.
* gate/up ``[2·ffn, hidden]``: rows ``[gate; up]`` — ``cat([gate_proj, up_proj], dim=0)`` of HF.

Rotary embeddings use the HF/LLaMA ``rotate_half`` convention (feature ``i`` paired with
``i + hd/2``), so HF q/k weights load without permutation.

Tensor parallelism is a property of the layers and of the ``parallel`` state they are built with:
under TP = t each rank runs this same code on ``nq/t`` query heads, ``nkv/t`` key/value groups
and ``ffn/t`` FFN features (the fused weights hold this rank's part of each of ``[q; k; v]`` and
``[gate; up]``); dropout on those split activations draws from the per-TP-rank RNG.
"""

from __future__ import annotations

import contextlib
import functools
import math

import torch
import torch.nn.functional as F
from torch import nn

from megatron_qsparse.config import ModelConfig
from megatron_qsparse.model.masking import document_attention
from megatron_qsparse.model.moe import build_ffn
from megatron_qsparse.parallel.layers import ColumnParallelLinear, RowParallelLinear, divide
from megatron_qsparse.parallel.random import checkpoint
from megatron_qsparse.parallel.state import ParallelState, get_parallel_state
from megatron_qsparse.sparsity import build_sparsifier


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    """fp32 for half types, else the input's own dtype (fp64 stays fp64)."""
    return torch.promote_types(x.dtype, torch.float32)


class RMSNorm(nn.Module):
    """RMSNorm in (at least) fp32 via ``F.rms_norm``, cast back, then scaled (as HF LLaMA)."""

    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.rms_norm(x.to(_compute_dtype(x)), (x.shape[-1],), eps=self.eps)
        return self.weight * y.type_as(x)


class LayerNorm(nn.Module):
    """LayerNorm with weight and bias, computed in (at least) fp32."""

    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))
        self.bias = nn.Parameter(torch.zeros(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.layer_norm(x.to(_compute_dtype(x)), (x.shape[-1],), eps=self.eps).type_as(x)
        return self.weight * y + self.bias


def build_norm(cfg: ModelConfig, dim: int | None = None) -> nn.Module:
    """The normalization layer chosen by ``cfg.normalization``."""
    cls = {"RMSNorm": RMSNorm, "LayerNorm": LayerNorm}[cfg.normalization]
    return cls(dim or cfg.hidden_size, cfg.norm_epsilon)


@functools.lru_cache(maxsize=16)
def rope_tables(dim: int, max_positions: int, base: float,
                 device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    inv = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.float64, device=device) / dim))
    freqs = torch.outer(torch.arange(max_positions, dtype=torch.float64, device=device), inv)
    emb = torch.cat([freqs, freqs], dim=-1)
    return emb.cos().float(), emb.sin().float()


class RotaryEmbedding(nn.Module):
    """cos/sin tables of rotary embeddings (theta ``base``), kept in fp32 whatever the model dtype.

    The tables are computed in fp64, stored in fp32 and shared by all layers through a
    per-device cache (not buffers), so ``model.to(bf16)`` cannot round them and they never enter
    the state dict.
    """

    def __init__(self, dim: int, max_positions: int, base: float = 10000.0):
        super().__init__()
        self.dim, self.max_positions, self.base = dim, max_positions, float(base)
        self._tables = rope_tables(dim, max_positions, self.base, torch.device("cpu"))

    def _apply(self, fn, recurse=True):
        # follow the module to a new device (not to a new dtype): the shared tables of that device
        moved = fn(torch.empty(0))
        if moved.device != self._tables[0].device:
            self._tables = rope_tables(self.dim, self.max_positions, self.base, moved.device)
        return super()._apply(fn, recurse)

    def forward(self, seq_len: int, device: torch.device, offset: int = 0,
                position_ids: torch.Tensor | None = None):
        """``(cos, sin)``, each ``[seq_len, dim]`` fp32, for positions ``offset`` onwards; with
        ``position_ids [b, seq_len]`` (positions restarting in every document, each below its
        index in the sequence) the rows of those positions, ``[b, 1, seq_len, dim]``."""
        if offset + seq_len > self.max_positions:
            raise ValueError(f"position {offset + seq_len - 1} is beyond the rotary table "
                             f"({self.max_positions}); raise --max-position-embeddings")
        cos, sin = self._tables
        if cos.device != torch.device(device):  # a module moved by other means than .to()
            cos, sin = self._tables = rope_tables(self.dim, self.max_positions, self.base,
                                                  torch.device(device))
        if position_ids is not None:
            return cos[position_ids].unsqueeze(1), sin[position_ids].unsqueeze(1)
        return cos[offset:offset + seq_len], sin[offset:offset + seq_len]

    def extra_repr(self) -> str:
        return f"dim={self.dim}, max_positions={self.max_positions}, base={self.base:g}"


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """``[x1, x2] -> [-x2, x1]`` over the last dim (HF LLaMA convention)."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([-x2, x1], dim=-1)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate ``x [..., s, hd]`` by position (in at least fp32; returned in ``x.dtype``)."""
    xf = x.to(_compute_dtype(x))
    return (xf * cos + rotate_half(xf) * sin).type_as(x)


class Attention(nn.Module):
    """Causal self-attention with RoPE and grouped-query attention (``nkv`` key/value heads).

    ``nq`` and ``nkv`` are this TP rank's head and group counts (all of them at TP = 1).
    """

    def __init__(self, cfg: ModelConfig, layer: int,
                 parallel: ParallelState | None = None):
        super().__init__()
        self.parallel = parallel if parallel is not None else get_parallel_state()
        tp = self.parallel.tp_size
        nq, nkv = cfg.num_attention_heads, cfg.resolved_query_groups()
        self.nq = divide(nq, tp, "--num-attention-heads")
        self.nkv = divide(nkv, tp, "--num-query-groups")
        self.hd = cfg.resolved_kv_channels()
        self.dropout = cfg.attention_dropout
        self.recompute_core = cfg.resolved_recompute() == "selective"
        std, qcfg = cfg.init_method_std, cfg.qsparse
        self.qkv = ColumnParallelLinear(
            cfg.hidden_size, (nq + 2 * nkv) * self.hd,
            bias=cfg.add_bias_linear or cfg.add_qkv_bias,
            sparsifier=build_sparsifier(qcfg, "qkv", layer), init_method_std=std,
            bitnet=qcfg.bitnet, parallel=self.parallel,
            output_sizes=(nq * self.hd, nkv * self.hd, nkv * self.hd))
        self.o = RowParallelLinear(
            nq * self.hd, cfg.hidden_size, bias=cfg.add_bias_linear,
            sparsifier=build_sparsifier(qcfg, "o", layer),
            init_method_std=std / math.sqrt(2.0 * cfg.num_layers), bitnet=qcfg.bitnet,
            parallel=self.parallel)
        self.rotary = RotaryEmbedding(self.hd, cfg.max_position_embeddings or cfg.seq_length,
                                      cfg.rotary_base)

    def forward(self, x: torch.Tensor, position_ids: torch.Tensor | None = None,
                segment_ids: torch.Tensor | None = None) -> torch.Tensor:
        """``x [b, s, hidden]``; ``position_ids [b, s]`` (RoPE positions, default ``0..s-1``) and
        ``segment_ids [b, s]`` (the document of each position: attention stays inside it;
        default one document) describe packed sequences (``model/masking.py``)."""
        b, s, _ = x.shape
        q, k, v = self.qkv(x).split(
            [self.nq * self.hd, self.nkv * self.hd, self.nkv * self.hd], dim=-1)
        q = q.view(b, s, self.nq, self.hd).transpose(1, 2)
        k = k.view(b, s, self.nkv, self.hd).transpose(1, 2)
        v = v.view(b, s, self.nkv, self.hd).transpose(1, 2)
        cos, sin = self.rotary(s, x.device, position_ids=position_ids)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        if self.recompute_core and self.training and torch.is_grad_enabled():
            y = checkpoint(self._core, q, k, v, segment_ids, state=self.parallel)
        else:
            y = self._core(q, k, v, segment_ids)
        return self.o(y.transpose(1, 2).reshape(b, s, self.nq * self.hd))

    def _core(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
              segment_ids: torch.Tensor | None = None) -> torch.Tensor:
        """Causal scaled-dot-product attention over this rank's heads (the part selective
        recomputation recomputes: its ``s x s`` probabilities are the largest activation),
        within each document when ``segment_ids`` are given."""
        dropout = self.dropout if self.training else 0.0
        gqa = self.nkv != self.nq
        with self.parallel.fork_rng() if dropout else contextlib.nullcontext():
            if segment_ids is not None:
                return document_attention(q, k, v, segment_ids, dropout, gqa)
            return F.scaled_dot_product_attention(q, k, v, is_causal=True, dropout_p=dropout,
                                                  enable_gqa=gqa)


class TransformerBlock(nn.Module):
    """Pre-norm block: ``x + drop(attn(norm(x)))``, then ``x + drop(mlp(norm(x)))``.

    ``layer`` is the 0-based block index; it names the block's density statistics. With
    ``--num-experts`` the FFN of the blocks ``--moe-layer-freq`` picks is an
    :class:`~megatron_qsparse.model.moe.MoELayer` (``ep_size``: expert-parallel degree).
    """

    def __init__(self, cfg: ModelConfig, layer: int,
                 parallel: ParallelState | None = None, ep_size: int = 1):
        super().__init__()
        self.layer = layer
        self.input_norm = build_norm(cfg)
        self.attention = Attention(cfg, layer, parallel)
        self.post_attention_norm = build_norm(cfg)
        self.mlp = build_ffn(cfg, layer, parallel, ep_size=ep_size)
        self.dropout = nn.Dropout(cfg.hidden_dropout)

    def forward(self, x: torch.Tensor, position_ids: torch.Tensor | None = None,
                segment_ids: torch.Tensor | None = None) -> torch.Tensor:
        """``x [b, s, hidden]``; ``position_ids``/``segment_ids``: see :class:`Attention`."""
        x = x + self.dropout(self.attention(self.input_norm(x), position_ids, segment_ids))
        return x + self.dropout(self.mlp(self.post_attention_norm(x)))
