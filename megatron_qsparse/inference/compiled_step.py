"""The compiled decode step: one C++ call per generated token (``csrc/decode_step.h``).

The layer-by-layer decode path runs a few hundred small PyTorch calls per token (norms, views,
RoPE, attention, splits, residual adds, one kernel call per projection). On small models their
dispatch costs more than the projections themselves, so sparsity hardly shows in tokens/s. The
compiled step does a whole token — embedding, every block (norm, Top-K + sparse GEMV per
projection, RoPE, KV-cache append, grouped-query attention, FFN activation, residuals), final
norm and LM head — in one call, on the same input-major weights (:class:`~.linear.DecodeLinear`)
and the same :class:`~.model.KVCache` as the layer-by-layer path, so a prefill by the layers and
decode steps by the compiled code mix freely.

It covers fp32 models (projection and LM-head weights fp32, bf16, fp16 or per-channel int8),
RMSNorm or LayerNorm, relu2_glu or swiglu FFN, dense or mixture-of-experts blocks (top-1 / top-2
routing as DeepSpeed's gate computes it for one token in evaluation, the router's input sparsified
or not; expert-parallel size 1), optional biases, GQA/MHA, and every sparsifier of
``sparsity/methods/`` that describes itself to the step (``decode_step_op``): plain Top-K (fused
selection and gather), int8-quantized Top-K, L2-rescaled Top-K, Block N:M, ReLU, magnitude
thresholds and dense projections, each with or without BitNet b1.58 (int8 activations, 2-bit
packed ternary rows). :func:`build_compiled_step` returns None and the reason for anything else
(fp64/bf16 models, no compiled kernels); such models decode layer by layer.

The logits equal the layer-by-layer path's up to fp32 summation order
(``tests/unit/test_inference.py``).
"""

from __future__ import annotations

import torch
from torch import nn

from megatron_qsparse.inference import cpu_kernels
from megatron_qsparse.inference.linear import DecodeLinear
from megatron_qsparse.model.mlp import MLP
from megatron_qsparse.model.moe import MoELayer
from megatron_qsparse.model.transformer import LayerNorm, RMSNorm, rope_tables
from megatron_qsparse.sparsity import kernels as _kernels
from megatron_qsparse.sparsity.activations import relu2_glu, swiglu

_EMPTY = torch.empty(0)


_SELECT = {"none": 0, "topk": 1, "block": 2, "relu": 3, "threshold": 4}  # decode_step.h Select


def _selection(sparsifier, in_features: int, bitnet: bool = False,
               alpha: float = 0.0) -> list[float] | str:
    """A projection input's selection for the step (``decode_step.h``: select, keep, n, m,
    threshold, quantize, rescale, bitnet, alpha), or why the step cannot run it."""
    if sparsifier is None:
        op = {"op": "none", "k": 0, "n": 0, "m": 0, "t": 0.0, "rescale": False,
              "quantize": False}
    else:
        op = sparsifier.decode_step_op(in_features)
        if isinstance(op, str):
            return op
    if op["op"] not in _SELECT:
        return f"selection {op['op']!r}"
    return [float(_SELECT[op["op"]]), float(op["k"]), float(op["n"]), float(op["m"]),
            float(op["t"]), float(op["quantize"]), float(op["rescale"]), float(bitnet),
            float(alpha) if bitnet else 0.0]


def _spec(p: DecodeLinear) -> list[float] | str:
    return _selection(p.sparsifier, p.in_features, p.bitnet, p.alpha if p.bitnet else 0.0)


def _ffns(mlp: nn.Module) -> tuple[list[MLP], MoELayer | None] | str:
    """The dense MLP of a block ([mlp], None), or the experts of its MoE layer (experts, layer)."""
    if isinstance(mlp, MLP):
        return [mlp], None
    if isinstance(mlp, MoELayer):
        if mlp.ep_size != 1 or mlp.num_local_experts != mlp.num_experts:
            return "expert-parallel MoE shard (decode holds every expert: EP = 1)"
        experts = [e.mlp for e in mlp.moe.deepspeed_moe.experts.deepspeed_experts]
        if not all(isinstance(e, MLP) for e in experts):
            return "MoE experts are not dense MLPs"
        return experts, mlp
    return f"FFN {type(mlp).__name__}"


def _norm_tensors(norm: nn.Module) -> list[torch.Tensor] | str:
    if isinstance(norm, RMSNorm):
        return [norm.weight.detach(), _EMPTY]
    if isinstance(norm, LayerNorm):
        return [norm.weight.detach(), norm.bias.detach()]
    return f"normalization {type(norm).__name__}"


def build_compiled_step(model: nn.Module, im: nn.Module | None = None
                        ) -> tuple[object | None, str]:
    """``(step, "")`` for a :class:`~megatron_qsparse.model.gpt.GPTModel` whose projections are
    :class:`DecodeLinear` layers, or ``(None, reason)`` when the compiled step does not cover it.
    ``im``: the :class:`~.model.InferenceModel` wrapping it, whose decode-dtype LM head
    (``head_wt``, ``head_scale``) the step then reads.

    ``step.step(token, pos, k_cache, v_cache)`` returns the fp32 logits ``[V]`` of one token.
    """
    if not cpu_kernels.available():
        return None, f"compiled kernels unavailable ({cpu_kernels.unavailable_reason()})"
    if not _kernels.kernels_enabled():
        return None, "compiled kernels switched off (sparsity.kernels.use_kernels(False))"
    emb = model.embedding.weight
    if emb.device.type != "cpu" or emb.dtype != torch.float32:
        return None, f"model is {emb.dtype} on {emb.device.type} (the compiled step runs fp32 on CPU)"
    cfg = model.config
    first = _ffns(model.layers[0].mlp)
    if isinstance(first, str):
        return None, first
    act = first[0][0].act
    if act not in (relu2_glu, swiglu):
        return None, "FFN activation is not relu2_glu / swiglu"
    norm_type = type(model.final_norm)
    weights, biases, keeps, norms, scales, specs, packed = [], [], [], [], [], [], []
    experts, router_topk, routers, router_specs = [], [], [], []
    for layer in model.layers:
        if any(type(n) is not norm_type for n in (layer.input_norm, layer.post_attention_norm)):
            return None, "normalization differs between layers"
        ffns = _ffns(layer.mlp)
        if isinstance(ffns, str):
            return None, ffns
        mlps, moe = ffns
        if any(m.act is not act or m.ffn != first[0][0].ffn for m in mlps):
            return None, "FFN activation or width differs between blocks"
        if moe is None:
            experts.append(0)
            router_topk.append(0)
            routers.append(_EMPTY)
            router_specs.append([])
        else:
            gate = moe.moe.deepspeed_moe.gate
            spec = (_selection(moe.router_sparsifier, cfg.hidden_size)
                    if moe.router_sparsifier is not None else [])
            if isinstance(spec, str):
                return None, f"MoE router input: {spec}"
            experts.append(len(mlps))
            router_topk.append(moe.topk)
            routers.append(gate.wg.weight.detach().float().t().contiguous())  # [h, E]
            router_specs.append(spec)
        a = layer.attention
        for p in (a.qkv, a.o, *[q for m in mlps for q in (m.gate_up, m.down)]):
            if not isinstance(p, DecodeLinear):
                return None, "projections are not DecodeLinear layers"
            spec = _spec(p)
            if isinstance(spec, str):
                return None, spec
            specs.append(spec)
            packed.append(p.packed if p.bitnet else _EMPTY)
            k = int(spec[1]) if spec[0] == _SELECT["topk"] else 0
            weights.append(p.wt)
            scales.append(_EMPTY if p.scale is None else p.scale)
            biases.append(_EMPTY if p.bias is None else p.bias.float().contiguous())
            keeps.append(k)
        for n in (layer.input_norm, layer.post_attention_norm):
            t = _norm_tensors(n)
            if isinstance(t, str):
                return None, t
            norms += t
    t = _norm_tensors(model.final_norm)
    if isinstance(t, str):
        return None, t
    norms += t
    att = model.layers[0].attention
    cos, sin = rope_tables(att.rotary.dim, att.rotary.max_positions, att.rotary.base,
                           torch.device("cpu"))
    head_t, head_scale = getattr(im, "head_wt", None), getattr(im, "head_scale", None)
    if head_t is None:
        head_t = cpu_kernels.on_huge_pages(cpu_kernels.tile_if_dense(  # input-major [h, V]
            model.output_weight().detach().float().t().contiguous()))
    step = cpu_kernels.extension().DecodeStep(
        hidden=cfg.hidden_size, nq=att.nq, nkv=att.nkv, hd=att.hd, ffn=first[0][0].ffn,
        rmsnorm=isinstance(model.final_norm, RMSNorm), eps=float(model.final_norm.eps),
        swiglu=act is swiglu, embedding=emb.detach().contiguous(), head_t=head_t,
        cos=cos.contiguous(), sin=sin.contiguous(), weights=weights, biases=biases, keeps=keeps,
        norms=[n.float().contiguous() if n.numel() else n for n in norms], scales=scales,
        head_scale=_EMPTY if head_scale is None else head_scale, specs=specs, packed=packed,
        experts=experts, router_topk=router_topk, routers=routers, router_specs=router_specs)
    return step, ""
