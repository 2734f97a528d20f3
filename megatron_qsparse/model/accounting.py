"""Parameter, activated-parameter and FLOP accounting of a GPT model (any TP / PP / EP split).

:func:`count_parameters` and :func:`activated_parameters` walk a built model (a
:class:`~megatron_qsparse.model.gpt.GPTModel` or one pipeline stage of it);
:func:`flops_per_token`, :func:`projection_shapes` and :func:`describe` need only the
:class:`~megatron_qsparse.config.ModelConfig`.
"""

from __future__ import annotations

import torch
from torch import nn

from megatron_qsparse.config import ModelConfig, moe_layer_indices
from megatron_qsparse.model.moe import moe_layers
from megatron_qsparse.parallel.layers import (ColumnParallelLinear, RowParallelLinear,
                                              VocabParallelEmbedding, full_numel)


def _lm_params(model: nn.Module) -> set[int]:
    """ids of the input embedding's and the LM head's parameters."""
    ids = set()
    for m in model.modules():
        if isinstance(m, VocabParallelEmbedding) or getattr(m, "is_lm_head", False):
            ids.update(id(p) for p in m.parameters())
    return ids


def _over_stages(model: nn.Module, value: float) -> float:
    """Sum ``value`` over the pipeline stages when ``model`` is one stage of a pipeline (every
    stage must call this), else ``value``."""
    parallel = getattr(model, "pipeline_state", None)
    if parallel is None or parallel.pp_size == 1:
        return value
    t = torch.tensor([float(value)], dtype=torch.float64)
    torch.distributed.all_reduce(t, group=parallel.pp_group)
    return t.item()


def _unique(model: nn.Module):
    """Parameters, each once: a pipeline stage's copy of a tied weight that another stage owns
    (the embedding on the last stage) is left out."""
    return [p for p in model.parameters() if not getattr(p, "pipeline_duplicate", False)]


def count_parameters(model: nn.Module, non_embedding: bool = False) -> int:
    """Number of parameters (shared ones once) of the full model, also when ``model`` holds
    tensor-parallel shards or is one stage of a pipeline (then every stage must call this).
    ``non_embedding`` leaves out the input embedding and the LM head (Kaplan's N, as in the
    Q-Sparse scaling law)."""
    skip = _lm_params(model) if non_embedding else set()
    # an expert parameter stands for expert_parallel_size different ones (one per EP rank)
    local = sum(full_numel(p) * getattr(p, "expert_parallel_size", 1)
                for p in _unique(model) if id(p) not in skip)
    return int(_over_stages(model, local))


def _density_of(density: dict | float | None, kind: str, layer: int | None = None) -> float:
    if density is None:
        return 1.0
    if isinstance(density, (int, float)):
        return float(density)
    for key in ((f"layer{layer}/{kind}",) if layer is not None else ()) + (f"kind/{kind}", kind):
        if key in density:
            return float(density[key])
    return 1.0


def activated_parameters(model: nn.Module, density: dict | float | None) -> float:
    """Parameters used per token given the measured input density of each projection.

    A sparse projection with input density ``ρ`` uses ``ρ`` of its weight columns, so it counts
    ``ρ·out·in`` (+ its bias); norms count fully. Like :func:`count_parameters` with
    ``non_embedding=True``, the input embedding (a row lookup, not a matmul) and the LM head are
    left out, so ``activated / non-embedding total = 1 - S`` for uniform Top-K.

    ``density`` is :func:`~megatron_qsparse.sparsity.collect_density`'s dict (``layer<i>/<kind>``
    is used where present, else ``kind/<kind>``, else a bare ``<kind>`` key), one float for every
    projection, or None; a projection with no entry counts as dense.

    In an MoE layer a token uses only the experts it is routed to: the experts count
    ``k·kept/E`` of all experts' parameters (``k`` routed experts, ``kept`` the measured fraction
    of routes within capacity, 1 before any forward), each expert projection again scaled by its
    measured input density; the router counts fully.
    """
    total = 0.0
    counted = _lm_params(model)
    share: dict[int, float] = {}  # id(expert linear) -> fraction of all experts used per token
    for moe in moe_layers(model):
        frac = moe.topk * moe.kept_routes_fraction() / moe.num_experts * moe.ep_size
        share.update({id(m): frac for m in moe.moe.deepspeed_moe.experts.modules()})
    for m in model.modules():
        if isinstance(m, (ColumnParallelLinear, RowParallelLinear)) and m.sparsifier is not None:
            rho = _density_of(density, m.sparsifier.kind, m.sparsifier.layer)
            n = rho * full_numel(m.weight) + (full_numel(m.bias) if m.bias is not None else 0)
            total += n * share.get(id(m), 1.0)
            counted.update(id(p) for p in m.parameters())
    total += sum(full_numel(p) for p in _unique(model) if id(p) not in counted)
    return _over_stages(model, total)


def projection_shapes(cfg: ModelConfig) -> dict[str, tuple[int, int]]:
    """``(in, out)`` of each projection kind of one block."""
    h, hd = cfg.hidden_size, cfg.resolved_kv_channels()
    nq, nkv = cfg.num_attention_heads, cfg.resolved_query_groups()
    f = cfg.resolved_ffn_hidden_size()
    return {"qkv": (h, (nq + 2 * nkv) * hd), "o": (nq * hd, h), "gate_up": (h, 2 * f),
            "down": (f, h)}


def flops_per_token(model_cfg: ModelConfig, vocab: int, seq_len: int,
                    density: dict | float | None = None) -> float:
    """Training FLOPs per token (forward + backward = 3 × forward; divide by 3 for inference).

    ``6·(N_proj + V·h) + 12·L·s·nq·hd``: every matmul parameter costs 6 FLOPs per token (PaLM's
    count), and attention scores and values the full ``s × s`` product (no causal halving).
    With ``density`` (as in :func:`activated_parameters`) the projection FLOPs of each kind are
    scaled by its input density — the nominal count of an ideal sparse kernel; attention and the
    LM head stay dense. Norms, activations and the softmax are ignored.

    An MoE layer's FFN counts its ``k`` routed experts (``--moe-router-topk``) plus the router's
    ``h × E`` matmul.
    """
    L = model_cfg.num_layers
    moe = set(moe_layer_indices(model_cfg))
    proj = 0.0
    for kind, (n_in, n_out) in projection_shapes(model_cfg).items():
        per = [_density_of(density, kind, i)
               * (model_cfg.moe_router_topk if i in moe and kind in ("gate_up", "down") else 1)
               for i in range(L)]
        proj += sum(per) * n_in * n_out
    proj += len(moe) * model_cfg.hidden_size * (model_cfg.num_experts or 0)
    attn = 12.0 * L * seq_len * model_cfg.num_attention_heads * model_cfg.resolved_kv_channels()
    return 6.0 * (proj + vocab * model_cfg.hidden_size) + attn


def describe(model_cfg: ModelConfig, vocab: int) -> str:
    """One-line summary of a model's size, for logs."""
    dims = projection_shapes(model_cfg)
    n = model_cfg.num_layers * sum(i * o for i, o in dims.values())
    moe, E = len(moe_layer_indices(model_cfg)), model_cfg.num_experts or 1
    ffn = sum(i * o for k, (i, o) in dims.items() if k in ("gate_up", "down"))
    n += moe * ((E - 1) * ffn + model_cfg.hidden_size * E)
    experts = (f", {E} experts (top-{model_cfg.moe_router_topk}) in {moe} blocks" if moe else "")
    return (f"{model_cfg.num_layers} layers, hidden {model_cfg.hidden_size}{experts}, "
            f"{n / 1e6:.1f}M projection params, vocab {vocab}, "
            f"{flops_per_token(model_cfg, vocab, model_cfg.seq_length) / 1e9:.2f} GFLOP/token")


__all__ = ["activated_parameters", "count_parameters", "describe", "flops_per_token",
           "projection_shapes"]
