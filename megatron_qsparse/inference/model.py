"""Inference-time model: a trained :class:`~megatron_qsparse.model.gpt.GPTModel` with a KV cache
and sparse decode projections.

:class:`InferenceModel` runs the trained modules themselves (embedding, norms, rotary tables,
FFN activation, LM head) in their training order, so a prefill equals the training forward; it
adds only what generation needs and leaves the training code paths untouched:

* a preallocated :class:`KVCache` (``[layers, batch, kv_heads, max_len, head_dim]`` for keys and
  values); each call appends its tokens' keys/values and attends to everything cached before,
  with RoPE at the right absolute positions (``offset``);
* every sparse projection replaced by a :class:`~megatron_qsparse.inference.linear.DecodeLinear`
  (input-major weight, sparse GEMV for single tokens) unless ``sparse_kernel=False``; a dense
  model (``--qsparse-mode none`` without BitNet) gets them only for the compiled step, else keeps
  its layers, out-major;
* the compiled decode step (:mod:`~megatron_qsparse.inference.compiled_step`, ``compiled_step=True``
  by default): one C++ call computes a whole single-token step on those weights and this cache,
  where it covers the model (``step_unavailable`` says why not otherwise).

:func:`load_inference_model` builds it from a checkpoint (tensor-parallel size 1).
"""

from __future__ import annotations

import logging
from collections import Counter

import torch
import torch.nn.functional as F
from torch import nn

from megatron_qsparse.inference import cpu_kernels
from megatron_qsparse.inference.linear import DecodeLinear
from megatron_qsparse.model.gpt import GPTModel
from megatron_qsparse.model.mlp import MLP
from megatron_qsparse.model.transformer import apply_rotary
from megatron_qsparse.sparsity import get_method, set_recording
from megatron_qsparse.sparsity.activations import relu2_glu

logger = logging.getLogger(__name__)


class KVCache:
    """Preallocated keys and values of every layer; ``length`` positions are filled."""

    def __init__(self, layers: int, batch: int, kv_heads: int, max_len: int, head_dim: int,
                 dtype: torch.dtype, device: torch.device | str = "cpu"):
        shape = (layers, batch, kv_heads, max_len, head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.max_len, self.length = max_len, 0

    def reset(self) -> None:
        self.length = 0


def _mlps(ffn: nn.Module) -> list[MLP]:
    """The dense MLPs of a block's FFN: itself, or the experts of an MoE layer."""
    if isinstance(ffn, MLP):
        return [ffn]
    return [m for m in ffn.modules() if isinstance(m, MLP)]


def _is_dense(model: GPTModel) -> bool:
    q = model.qsparse_config
    return get_method(q.mode).dense and not q.bitnet


class InferenceModel(nn.Module):
    """Generation wrapper around a trained GPT model (TP = 1). See the module docstring.

    ``forward(tokens [b, s], cache, last_only=False)`` returns logits ``[b, s, V]`` (``[b, 1, V]``
    with ``last_only``) for the ``s`` tokens at positions ``cache.length ..``, and advances the
    cache.
    """

    def __init__(self, model: GPTModel, *, sparse_kernel: bool = True,
                 weight_dtype: torch.dtype | None = None, compiled_step: bool = True):
        super().__init__()
        if model.parallel.tp_size != 1:
            raise ValueError("InferenceModel: tensor-parallel models are not supported; merge the "
                             "checkpoint to tensor-parallel size 1")
        self.model = model.eval()
        set_recording(model, False)  # no density bookkeeping per token
        dense = _is_dense(model)
        self.sparse_kernel = sparse_kernel and not dense
        # a dense model gets input-major DecodeLinear layers too when the compiled step will use
        # them (one weight copy either way)
        decode_layers = self.sparse_kernel or (sparse_kernel and compiled_step and dense)
        if decode_layers:
            for layer in model.layers:
                a = layer.attention
                a.qkv = DecodeLinear(a.qkv, weight_dtype=weight_dtype)
                a.o = DecodeLinear(a.o, weight_dtype=weight_dtype)
                # the dense FFN, or every expert of an MoE layer (DeepSpeed's routing stays)
                for m in _mlps(layer.mlp):
                    m.gate_up = DecodeLinear(m.gate_up, weight_dtype=weight_dtype)
                    # ReLU² GLU outputs are about half exact zeros: their rows are skipped one
                    # by one, which the row layout serves (dense inputs read tiled)
                    m.down = DecodeLinear(m.down, weight_dtype=weight_dtype,
                                          tile=m.act is not relu2_glu)
        # the LM head, input-major, in the decode weight dtype (like the projections: llama.cpp's
        # f16 / q8_0 files hold output.weight so too); None: the model's own weight, fp32
        self.head_wt = self.head_scale = None
        if weight_dtype is not None and decode_layers:
            with torch.no_grad():
                w = model.output_weight().detach().t()
                if weight_dtype == torch.int8:
                    self.head_wt, self.head_scale = cpu_kernels.quantize_int8(w)
                else:
                    self.head_wt = w.to(weight_dtype).contiguous()
                if self.head_wt.device.type == "cpu":
                    self.head_wt = cpu_kernels.on_huge_pages(cpu_kernels.tile_if_dense(self.head_wt))
        self.step, self.step_unavailable = None, "off"
        if sparse_kernel and compiled_step:
            from megatron_qsparse.inference.compiled_step import build_compiled_step

            self.step, self.step_unavailable = build_compiled_step(model, self)
            if self.step is None:
                logger.info("compiled decode step not used (%s): decoding layer by layer",
                            self.step_unavailable)
        att = model.layers[0].attention
        self.nq, self.nkv, self.hd = att.nq, att.nkv, att.hd
        self.max_positions = att.rotary.max_positions
        self.num_layers = model.config.num_layers

    def decode_paths(self) -> dict[str, int]:
        """How many projections take each decode path: ``compiled-step`` (all, when the compiled
        step runs the token), else per layer (see ``DecodeLinear.path``); ``dense`` for a dense
        model's own layers, ``reference`` (the training layers) with ``sparse_kernel=False``."""
        if self.step is not None:
            return {"compiled-step": sum(isinstance(m, DecodeLinear) for m in self.model.modules())}
        paths = Counter(m.path() for m in self.model.modules() if isinstance(m, DecodeLinear))
        if not paths:
            paths["dense" if _is_dense(self.model) else "reference"] = 4 * self.num_layers
        return dict(paths)

    def new_cache(self, batch: int, max_len: int) -> KVCache:
        if max_len > self.max_positions:
            raise ValueError(f"{max_len} positions exceed the model's {self.max_positions} "
                             "(its rotary table); generate fewer tokens or shorten the prompt")
        p = self.model.embedding.weight
        return KVCache(self.num_layers, batch, self.nkv, max_len, self.hd, p.dtype, p.device)

    def _attention(self, att: nn.Module, x: torch.Tensor, cache: KVCache, i: int,
                   pos: int) -> torch.Tensor:
        b, s, _ = x.shape
        nq, nkv, hd = self.nq, self.nkv, self.hd
        q, k, v = att.qkv(x).split([nq * hd, nkv * hd, nkv * hd], dim=-1)
        q = q.view(b, s, nq, hd).transpose(1, 2)
        k = k.view(b, s, nkv, hd).transpose(1, 2)
        v = v.view(b, s, nkv, hd).transpose(1, 2)
        cos, sin = att.rotary(s, x.device, offset=pos)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        end = pos + s
        cache.k[i, :b, :, pos:end] = k
        cache.v[i, :b, :, pos:end] = v
        keys, values = cache.k[i, :b, :, :end], cache.v[i, :b, :, :end]
        gqa = nkv != nq
        if s == 1:  # one new token sees every cached position
            y = F.scaled_dot_product_attention(q, keys, values, enable_gqa=gqa)
        elif pos == 0:
            y = F.scaled_dot_product_attention(q, keys, values, is_causal=True, enable_gqa=gqa)
        else:  # a chunk after cached tokens: causal within the chunk, all of the past
            mask = torch.ones(s, end, dtype=torch.bool, device=x.device).tril(diagonal=pos)
            y = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask, enable_gqa=gqa)
        return att.o(y.transpose(1, 2).reshape(b, s, nq * hd))

    def forward(self, tokens: torch.Tensor, cache: KVCache, last_only: bool = False
                ) -> torch.Tensor:
        b, s = tokens.shape
        pos = cache.length
        if pos + s > cache.max_len:
            raise ValueError(f"KV cache full: {pos} + {s} tokens > {cache.max_len} positions")
        if self.step is not None and b == 1 and s == 1 and tokens.device.type == "cpu":
            return self.decode_token(int(tokens), cache).view(1, 1, -1)
        m = self.model
        h = m.embedding(tokens)
        for i, layer in enumerate(m.layers):
            h = h + self._attention(layer.attention, layer.input_norm(h), cache, i, pos)
            h = h + layer.mlp(layer.post_attention_norm(h))
        cache.length = pos + s
        if last_only:
            h = h[:, -1:]
        return self.head(m.final_norm(h))

    def head(self, h: torch.Tensor) -> torch.Tensor:
        """Logits of final-normed hidden states: the model's LM head, or its decode-dtype copy
        (one token: the kernel; several: the dequantized weight)."""
        if self.head_wt is None:
            return F.linear(h, self.model.output_weight())
        if (h.numel() == cpu_kernels.weight_shape(self.head_wt)[0] and h.device.type == "cpu"
                and h.dtype != torch.float64 and cpu_kernels.available()):
            y = cpu_kernels.gemv_nonzero(h, self.head_wt, scale=self.head_scale)
            return y.view(*h.shape[:-1], -1).to(h.dtype)
        return h @ cpu_kernels.dequantize(self.head_wt, self.head_scale).to(h.dtype)

    def decode_token(self, token: int, cache: KVCache) -> torch.Tensor:
        """Logits ``[V]`` of one token (batch 1) at the next cache position: the generation
        loop's call (no tensor round trips when the compiled step runs it)."""
        pos = cache.length
        if self.step is None:
            tokens = torch.tensor([[token]], device=self.model.embedding.weight.device)
            return self(tokens, cache, last_only=True)[0, -1]
        if pos >= cache.max_len:
            raise ValueError(f"KV cache full: {pos} + 1 tokens > {cache.max_len} positions")
        logits = self.step.step(token, pos, cache.k, cache.v)
        cache.length = pos + 1
        return logits


def load_inference_model(path: str, *, sparse_kernel: bool = True,
                         weight_dtype: torch.dtype | None = None, compiled_step: bool = True):
    """``(InferenceModel, Config)`` from a checkpoint folder (see
    :func:`~megatron_qsparse.checkpoint.load_model`)."""
    from megatron_qsparse.checkpoint import load_model

    model, cfg = load_model(path)
    return InferenceModel(model, sparse_kernel=sparse_kernel, weight_dtype=weight_dtype,
                          compiled_step=compiled_step), cfg
