"""The inference form of a sparse projection: input-major weight, sparse GEMV for one token.

:class:`DecodeLinear` replaces a (TP = 1) :class:`~megatron_qsparse.parallel.layers.ColumnParallelLinear`
or :class:`~megatron_qsparse.parallel.layers.RowParallelLinear` of a trained model. It keeps the
layer's own :class:`~megatron_qsparse.sparsity.Sparsifier` (so the kept inputs are exactly the
ones training would keep: every method of ``sparsity/methods/`` with its settings) and holds the weight once, input-major (``wt = W.T``, ``[in, out]``; tiled
``[out/64, in, 64]`` for 16-bit and int8 weights of a layer without a selection, see
:func:`~megatron_qsparse.inference.cpu_kernels.tile_dense`):

* **decode** (one token): the sparse GEMV of :mod:`~megatron_qsparse.inference.cpu_kernels`
  (on CUDA: :mod:`~megatron_qsparse.inference.triton_kernels`, when Triton is installed; BitNet
  on CUDA uses the reference) reads only the rows of ``wt`` of the kept inputs. A method that
  selects a fixed K per token (``Sparsifier.keep``: plain Top-K) runs fused — selection and
  product in one compiled call; every other one runs the sparsifier, then the product over its
  nonzero entries. BitNet b1.58 reads 2-bit packed ternary rows.
* **prefill** (several tokens) and any input the kernels do not take (not CPU, fp64, kernels
  unavailable): the reference, ``F.linear(sparsify(x), W)`` — the training forward, computed on
  the input-major copy (one weight copy in memory; the GEMM may sum in another order).

Both give the training layer's output up to fp32 summation order (``tests/unit/test_decode_kernels.py``).
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F
from torch import nn

from megatron_qsparse.inference import cpu_kernels
from megatron_qsparse.model.mlp import MLP
from megatron_qsparse.sparsity.bitnet import absmean, int8_activation, ternary_weight

logger = logging.getLogger(__name__)

_TRITON: list = []


def _triton_kernels():
    """:mod:`.triton_kernels` when CUDA and Triton are present, else None (imported once)."""
    if not _TRITON:
        try:
            from megatron_qsparse.inference import triton_kernels
        except ImportError:
            triton_kernels = None
        _TRITON.append(triton_kernels)
    return _TRITON[0]


class DecodeLinear(nn.Module):
    """``y = sparsify(x) Wᵀ + b`` for inference, from a trained sparse linear layer.

    Args:
        layer: a ColumnParallelLinear / RowParallelLinear at tensor-parallel size 1.
        sparse_kernel: use the sparse GEMV for single tokens (else always the reference).
        weight_dtype: storage dtype of the input-major weight (default: the layer's; ``bfloat16``
            or ``float16`` halve the decode traffic at 16-bit rounding of the weights, ``int8``
            quarters it: symmetric per-output-channel codes with one fp32 scale per output,
            :func:`~megatron_qsparse.inference.cpu_kernels.quantize_int8`).
        tile: hold the 16-bit or int8 weight of a projection without a selection (dense: every
            input is read) tiled (:func:`~megatron_qsparse.inference.cpu_kernels.tile_dense`),
            which its dense product streams faster; prefill then multiplies by the untiled
            weight. Pass False
            where the inputs hold many exact zeros (the down projection after a ReLU² GLU),
            whose rows the row layout skips one by one.
    """

    def __init__(self, layer: nn.Module, *, sparse_kernel: bool = True,
                 weight_dtype: torch.dtype | None = None, tile: bool = True):
        super().__init__()
        if getattr(layer, "parallel", None) is not None and layer.parallel.tp_size != 1:
            raise ValueError("DecodeLinear: the layer is a tensor-parallel shard; merge the "
                             "checkpoint to tensor-parallel size 1 first")
        self.sparsifier = layer.sparsifier
        self.bitnet = bool(layer.bitnet)
        self.sparse_kernel = sparse_kernel
        self.in_features, self.out_features = layer.input_size, layer.output_size
        w = layer.weight.detach()
        sp = self.sparsifier
        # selection and product run fused where the method selects a fixed K (plain Top-K; K is
        # read at each call: warm-up scale); keep 0 means "every nonzero input" (dense)
        keep = sp.keep(self.in_features) if sp is not None else 0
        self.fused = isinstance(keep, int) and keep > 0 and not self.bitnet
        self.selects = not (isinstance(keep, int) and keep == 0)
        with torch.no_grad():
            if self.bitnet:
                # the exact weight training multiplies by, and its 2-bit codes for the kernel
                alpha = absmean(w)
                w = ternary_weight(w)
                codes = (w.float() / alpha).round().clamp(-1, 1) if float(alpha) > 0 else \
                    torch.zeros_like(w, dtype=torch.float32)
                self.register_buffer("packed", cpu_kernels.on_huge_pages(
                    cpu_kernels.pack_ternary(codes)), persistent=False)
                self.alpha = float(alpha)
            scale = None
            if weight_dtype == torch.int8:
                wt, scale = cpu_kernels.quantize_int8(w.t())
            else:
                wt = w.t().to(weight_dtype or w.dtype).contiguous()
            if wt.device.type == "cpu":
                if tile and sparse_kernel and not self.selects and not self.bitnet:
                    wt = cpu_kernels.tile_if_dense(wt)
                wt = cpu_kernels.on_huge_pages(wt)
        self.register_buffer("wt", wt, persistent=False)
        self.register_buffer("scale", scale, persistent=False)
        bias = layer.bias.detach().clone() if layer.bias is not None else None
        self.register_buffer("bias", bias, persistent=False)

    def path(self) -> str:
        """Which decode path this layer takes: ``fused-topk``, ``sparsify+nonzero-gemv``,
        ``nonzero-gemv`` (no sparsifier), ``sparsify+ternary-gemv`` or ``reference``."""
        if not (self.sparse_kernel and cpu_kernels.available()):
            return "reference"
        if self.bitnet:
            return "sparsify+ternary-gemv"
        if self.fused:
            return "fused-topk"
        return "sparsify+nonzero-gemv" if self.selects else "nonzero-gemv"

    def _sparse_input(self, x: torch.Tensor) -> torch.Tensor:
        if self.sparsifier is not None:
            x = self.sparsifier(x)
        return int8_activation(x) if self.bitnet else x

    def weight_t(self) -> torch.Tensor:
        """The input-major weight the stored one stands for, in the model's float dtype
        (dequantized for int8; fp16 upcast, so prefill activations never overflow fp16)."""
        return cpu_kernels.dequantize(self.wt, self.scale)

    def reference(self, x: torch.Tensor) -> torch.Tensor:
        """The training forward: ``F.linear(sparsify(x), W, b)`` (int8 activations for BitNet)."""
        xs = self._sparse_input(x)
        wt = cpu_kernels.untile(self.wt)
        if wt.dtype in (torch.int8, torch.float16) and xs.dtype != wt.dtype:
            wt = self.weight_t().to(xs.dtype)
            return F.linear(xs, wt.t(), None if self.bias is None else self.bias.to(xs.dtype))
        if wt.dtype != xs.dtype:  # bf16 storage of an fp32 model
            return F.linear(xs.to(wt.dtype), wt.t(), None if self.bias is None else
                            self.bias.to(wt.dtype)).to(x.dtype)
        return F.linear(xs, wt.t(), self.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if (x.is_cuda and self.sparse_kernel and not self.bitnet and x.numel() == self.in_features
                and self.scale is None):
            tk = _triton_kernels()
            if tk is not None:
                if self.fused:
                    y = tk.gemv_topk(x, self.wt, self.sparsifier.keep(self.in_features), self.bias)
                else:
                    y = tk.gemv_nonzero(self._sparse_input(x), self.wt, self.bias)
                return y.to(x.dtype)
        if (not self.sparse_kernel or x.numel() != self.in_features or x.device.type != "cpu"
                or x.dtype == torch.float64 or not cpu_kernels.available()):
            return self.reference(x)
        if self.fused:
            y = cpu_kernels.gemv_topk(x, self.wt, self.sparsifier.keep(self.in_features),
                                      self.bias, scale=self.scale)
        elif self.bitnet:
            y = cpu_kernels.gemv_ternary(self._sparse_input(x), self.packed, self.out_features,
                                         self.alpha, self.bias)
        else:
            y = cpu_kernels.gemv_nonzero(self._sparse_input(x), self.wt, self.bias,
                                         scale=self.scale)
        return y if y.dtype == x.dtype else y.to(x.dtype)

    def extra_repr(self) -> str:
        return (f"in={self.in_features}, out={self.out_features}, bitnet={self.bitnet}, "
                f"weight={str(self.wt.dtype).replace('torch.', '')} input-major"
                f"{' tiled' if self.wt.dim() == 3 else ''}, "
                f"decode={self.path()}")


@torch.no_grad()
def round_trip_decode_weights(model: nn.Module, weight_dtype: torch.dtype | None) -> int:
    """Replace, in place, every block projection's weight and the LM head of a (TP = 1) GPT model
    by the value the decode kernels compute with when they hold it as ``weight_dtype``
    (``bfloat16`` / ``float16`` rounding, or ``int8`` codes × per-output-channel scales), so that
    a perplexity run measures what ``--decode-weight-dtype`` costs in accuracy. With tied
    embeddings the embedding rows are rounded too (the decode path keeps its lookup fp32).
    Returns the number of matrices changed (0 for None)."""
    if weight_dtype is None:
        return 0
    mats = []
    for layer in model.layers:
        a = layer.attention
        mlps = [m for m in layer.mlp.modules() if isinstance(m, MLP)]  # dense FFN or experts
        for p in (a.qkv, a.o, *[q for m in mlps for q in (m.gate_up, m.down)]):
            mats.append(p.weight)
    mats.append(model.output_weight())
    for w in mats:
        wt = w.t()
        if weight_dtype == torch.int8:
            q, scale = cpu_kernels.quantize_int8(wt)
            w.copy_(cpu_kernels.dequantize(q, scale).t())
        else:
            w.copy_(wt.to(weight_dtype).t())
    return len(mats)

