"""The GPT (LLaMA-style decoder) model, and :func:`mean_loss`, the reduction of its per-token loss
to a micro-batch's training loss.

Its parameter / FLOP accounting is :mod:`megatron_qsparse.model.accounting`, its pipeline form
(DeepSpeed layer specs) :mod:`megatron_qsparse.model.pipeline`, the TP partition of its state
dict :mod:`megatron_qsparse.model.sharding`.
"""

from __future__ import annotations

import contextlib
import logging

import torch
from torch import nn

from megatron_qsparse.config import ModelConfig
from megatron_qsparse.model.accounting import count_parameters
from megatron_qsparse.model.transformer import TransformerBlock, build_norm
from megatron_qsparse.parallel.cross_entropy import vocab_parallel_cross_entropy
from megatron_qsparse.parallel.layers import (ColumnParallelLinear, VocabParallelEmbedding,
                                              parallel_lm_logits)
from megatron_qsparse.parallel.mappings import gather_from_tensor_parallel
from megatron_qsparse.parallel.random import checkpoint
from megatron_qsparse.parallel.state import ParallelState, get_parallel_state

logger = logging.getLogger(__name__)


class GPTModel(nn.Module):
    """Embedding → ``num_layers`` :class:`TransformerBlock` → final norm → LM head.

    The seven projections of every block (q/k/v fused, o, gate/up fused, down) sparsify their
    input as ``model_cfg.qsparse`` says. The LM head's input is *not* sparsified (the paper sparsifies
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

    ``init_seed``: when given, piece ``i`` of the layer sequence (0 the embedding, ``1..L`` the
    blocks, ``L+1`` the final norm, ``L+2`` the untied head) is initialised from
    ``torch.manual_seed(init_seed + i)``, exactly as DeepSpeed's pipeline module seeds its layers
    (:func:`~megatron_qsparse.model.pipeline.build_pipeline_model`), so any pipeline split starts
    from the same weights. Without it the pieces draw one after another from the current
    generator.

    Mixture of experts (``--num-experts``, :mod:`megatron_qsparse.model.moe`):
    ``expert_parallel_size`` splits each MoE layer's experts over that many ranks. The forward
    still returns the pure LM loss; the routers' weighted auxiliary losses of the latest forward
    are :func:`~megatron_qsparse.model.moe.moe_aux_loss` ``(model)``, which the training loop
    adds before ``backward``.
    """

    def __init__(self, model_cfg: ModelConfig, vocab_size: int,
                 parallel: ParallelState | None = None, init_seed: int | None = None,
                 expert_parallel_size: int = 1):
        super().__init__()
        self.config, self.vocab_size = model_cfg, vocab_size
        self.qsparse_config = model_cfg.qsparse
        self.parallel = parallel if parallel is not None else get_parallel_state()
        self.recompute_blocks = model_cfg.resolved_recompute() == "full"
        std = model_cfg.init_method_std
        L = model_cfg.num_layers
        with _seeded(init_seed, 0):
            self.embedding = VocabParallelEmbedding(vocab_size, model_cfg.hidden_size, std,
                                                    parallel=self.parallel)
        layers = []
        for i in range(L):
            with _seeded(init_seed, 1 + i):
                layers.append(TransformerBlock(model_cfg, i, self.parallel,
                                               ep_size=expert_parallel_size))
        self.layers = nn.ModuleList(layers)
        self.final_norm = build_norm(model_cfg)
        self.output_layer = None
        if model_cfg.untie_embeddings_and_output_weights:
            with _seeded(init_seed, L + 2):
                self.output_layer = ColumnParallelLinear(
                    model_cfg.hidden_size, vocab_size, bias=False, sparsifier=None,
                    init_method_std=std, parallel=self.parallel)
            self.output_layer.is_lm_head = True
        logger.debug("GPTModel: %d parameters", count_parameters(self))

    def output_weight(self) -> torch.Tensor:
        """The LM head matrix ``[vocab, hidden]`` (the embedding when tied; this rank's vocabulary
        rows under TP)."""
        return self.embedding.weight if self.output_layer is None else self.output_layer.weight

    def forward(self, tokens: torch.Tensor, labels: torch.Tensor | None = None,
                position_ids: torch.Tensor | None = None,
                segment_ids: torch.Tensor | None = None) -> torch.Tensor:
        """Logits ``[b, s, V]`` when ``labels`` is None, else the fp32 per-token loss ``[b, s]``.

        The cross entropy is computed in fp32 (fp64 for an fp64 model); label ``-100`` gives a
        loss of 0 at that position. Packed sequences (several documents each) pass
        ``position_ids [b, s]`` (RoPE positions restarting in every document) and/or
        ``segment_ids [b, s]`` (the document of every position; attention stays inside it),
        as ``--sft-packing``, ``--reset-position-ids`` and ``--reset-attention-mask`` batches do.
        """
        h = self.embedding(tokens)
        recompute = self.recompute_blocks and self.training and torch.is_grad_enabled()
        for layer in self.layers:
            if recompute:
                h = checkpoint(layer, h, position_ids, segment_ids, state=self.parallel)
            else:
                h = layer(h, position_ids, segment_ids)
        return self.head(h, labels)

    def head(self, h: torch.Tensor, labels: torch.Tensor | None) -> torch.Tensor:
        """Final norm, LM head and (with ``labels``) the per-token loss of the last hidden
        states: one region, which ``--torch-compile`` compiles like a block."""
        h = self.final_norm(h)
        logits = parallel_lm_logits(h, self.output_weight(), self.parallel)  # [b, s, V/tp]
        if labels is None:
            return gather_from_tensor_parallel(logits, self.parallel)
        return vocab_parallel_cross_entropy(logits, labels, self.parallel)


def _seeded(seed: int | None, offset: int) -> contextlib.AbstractContextManager:
    """Draw from ``torch.manual_seed(seed + offset)`` inside the block (the caller's generator is
    restored after); a no-op when ``seed`` is None."""
    if seed is None:
        return contextlib.nullcontext()

    @contextlib.contextmanager
    def ctx():
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed + offset)
            yield
    return ctx()


def mean_loss(per_token: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean of the per-token loss over the trained targets (label != -100) of the micro-batch;
    the plain mean when every target is trained (pretraining)."""
    trained = labels != -100
    return (per_token.float() * trained).sum() / trained.sum().clamp(min=1)


__all__ = ["GPTModel", "mean_loss"]
