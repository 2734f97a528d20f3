"""The GPT (LLaMA-style decoder) model and its parameter / FLOP accounting."""

from __future__ import annotations

import logging

import torch
from torch import nn

from megatron_qsparse.config import ModelConfig, QSparseConfig
from megatron_qsparse.model.transformer import TransformerBlock, build_norm
from megatron_qsparse.parallel.cross_entropy import vocab_parallel_cross_entropy
from megatron_qsparse.parallel.layers import (ColumnParallelLinear, RowParallelLinear,
                                              VocabParallelEmbedding, full_numel,
                                              parallel_lm_logits)
from megatron_qsparse.parallel.mappings import gather_from_tensor_parallel
from megatron_qsparse.parallel.state import ParallelState, get_parallel_state

logger = logging.getLogger(__name__)


class GPTModel(nn.Module):
    """Embedding → ``num_layers`` :class:`TransformerBlock` → final norm → LM head.

    The seven projections of every block (q/k/v fused, o, gate/up fused, down) sparsify their
    input as ``qsparse_cfg`` says. The LM head's input is *not* sparsified (the paper sparsifies
    the block projections only), nor BitNet-quantized. The head is the transposed input embedding
    unless ``untie_embeddings_and_output_weights``.

    Initialisation (deterministic under ``torch.manual_seed``): every weight ~ N(0, std), the
    output projections (o, down) with ``std / sqrt(2·num_layers)`` (Megatron's scaled init), norm
    weights 1, biases 0.

    ``vocab_size`` is the padded vocabulary (the caller pads it).

    ``parallel`` (default: the current :class:`~megatron_qsparse.parallel.state.ParallelState`)
    decides the tensor-parallel shards every layer holds; the code below is the same for any TP
    size. Under TP the vocabulary is split too: the loss is the vocab-parallel cross entropy, and
    logits are all-gathered only when asked for (``labels=None``).
    """

    def __init__(self, model_cfg: ModelConfig, qsparse_cfg: QSparseConfig, vocab_size: int,
                 parallel: ParallelState | None = None):
        super().__init__()
        self.config, self.qsparse_config, self.vocab_size = model_cfg, qsparse_cfg, vocab_size
        self.parallel = parallel if parallel is not None else get_parallel_state()
        std = model_cfg.init_method_std
        self.embedding = VocabParallelEmbedding(vocab_size, model_cfg.hidden_size, std,
                                                parallel=self.parallel)
        self.layers = nn.ModuleList(TransformerBlock(model_cfg, qsparse_cfg, i, self.parallel)
                                    for i in range(model_cfg.num_layers))
        self.final_norm = build_norm(model_cfg)
        self.output_layer = None
        if model_cfg.untie_embeddings_and_output_weights:
            self.output_layer = ColumnParallelLinear(model_cfg.hidden_size, vocab_size, bias=False,
                                                     sparsifier=None, init_method_std=std,
                                                     parallel=self.parallel)
        logger.debug("GPTModel: %d parameters", count_parameters(self))

    def output_weight(self) -> torch.Tensor:
        """The LM head matrix ``[vocab, hidden]`` (the embedding when tied; this rank's vocabulary
        rows under TP)."""
        return self.embedding.weight if self.output_layer is None else self.output_layer.weight

    def forward(self, tokens: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        """Logits ``[b, s, V]`` when ``labels`` is None, else the fp32 per-token loss ``[b, s]``.

        The cross entropy is computed in fp32 (fp64 for an fp64 model); label ``-100`` gives a
        loss of 0 at that position.
        """
        h = self.embedding(tokens)
        for layer in self.layers:
            h = layer(h)
        h = self.final_norm(h)
        logits = parallel_lm_logits(h, self.output_weight(), self.parallel)  # [b, s, V/tp]
        if labels is None:
            return gather_from_tensor_parallel(logits, self.parallel)
        return vocab_parallel_cross_entropy(logits, labels, self.parallel)


# ---------------------------------------------------------------------------------------------
# accounting


def count_parameters(model: nn.Module, non_embedding: bool = False) -> int:
    """Number of parameters (shared ones once) of the full model, also when ``model`` holds
    tensor-parallel shards. ``non_embedding`` leaves out the input embedding and the LM head
    (Kaplan's N, as in the Q-Sparse scaling law)."""
    skip = set()
    if non_embedding:
        for m in model.modules():
            if isinstance(m, GPTModel):
                skip.add(id(m.embedding.weight))
                if m.output_layer is not None:
                    skip.update(id(p) for p in m.output_layer.parameters())
    return sum(full_numel(p) for p in model.parameters() if id(p) not in skip)


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
    """
    total = 0.0
    counted = set()
    for m in model.modules():
        if isinstance(m, (ColumnParallelLinear, RowParallelLinear)) and m.sparsifier is not None:
            rho = _density_of(density, m.sparsifier.kind, m.sparsifier.layer)
            total += rho * full_numel(m.weight) + (full_numel(m.bias) if m.bias is not None else 0)
            counted.update(id(p) for p in m.parameters())
    for m in model.modules():
        if isinstance(m, GPTModel):
            counted.add(id(m.embedding.weight))
            if m.output_layer is not None:
                counted.update(id(p) for p in m.output_layer.parameters())
    total += sum(full_numel(p) for p in model.parameters() if id(p) not in counted)
    return total


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
    """
    L = model_cfg.num_layers
    proj = 0.0
    for kind, (n_in, n_out) in projection_shapes(model_cfg).items():
        proj += sum(_density_of(density, kind, i) for i in range(L)) * n_in * n_out
    attn = 12.0 * L * seq_len * model_cfg.num_attention_heads * model_cfg.resolved_kv_channels()
    return 6.0 * (proj + vocab * model_cfg.hidden_size) + attn


def describe(model_cfg: ModelConfig, vocab: int) -> str:
    """One-line summary of a model's size, for logs."""
    dims = projection_shapes(model_cfg)
    n = model_cfg.num_layers * sum(i * o for i, o in dims.values())
    return (f"{model_cfg.num_layers} layers, hidden {model_cfg.hidden_size}, "
            f"{n / 1e6:.1f}M projection params, vocab {vocab}, "
            f"{flops_per_token(model_cfg, vocab, model_cfg.seq_length) / 1e9:.2f} GFLOP/token")


__all__ = ["GPTModel", "count_parameters", "activated_parameters", "flops_per_token",
           "projection_shapes", "describe"]
