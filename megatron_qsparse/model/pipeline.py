"""The pipeline form of the GPT model: its layer sequence as DeepSpeed layer specs.

:func:`pipeline_specs` lists the pieces of :class:`~megatron_qsparse.model.gpt.GPTModel` in order
(embedding, blocks, final norm, LM head), :func:`build_pipeline_model` makes this rank's stage of
them a ``deepspeed.pipe.PipelineModule``, and :func:`pipeline_layer_names` maps a spec index to
the model's parameter prefix (DeepSpeed's per-layer checkpoint files are named by that index).

Packed sequences (``--sft-packing``, ``--reset-position-ids``, ``--reset-attention-mask``) give
the model ``position_ids``/``segment_ids`` besides the tokens. DeepSpeed's pipeline engine moves a
tuple of tensors from stage to stage (integer ones get no gradient), so with ``fields`` (the
names of those extra tensors, in order) every stage takes and returns ``(hidden, *extras)``: the
first stage reads ``(tokens, *extras)`` from the micro-batch, every block passes the extras to its
attention, the final norm drops them. The tuple-taking pieces are subclasses of the model's own
(same parameters, same checkpoint files); without ``fields`` the stages are the plain modules.
"""

from __future__ import annotations

import functools

import torch

from megatron_qsparse.config import ModelConfig
from megatron_qsparse.model.gpt import mean_loss
from megatron_qsparse.model.transformer import LayerNorm, RMSNorm, TransformerBlock, build_norm
from megatron_qsparse.parallel.cross_entropy import vocab_parallel_cross_entropy
from megatron_qsparse.parallel.layers import (ColumnParallelLinear, VocabParallelEmbedding,
                                              parallel_lm_logits)
from megatron_qsparse.parallel.random import checkpoint
from megatron_qsparse.parallel.state import ParallelState

PIPE_EMBED_KEY = "embed"


def _tied_lm_head(embedding: VocabParallelEmbedding, h: torch.Tensor) -> torch.Tensor:
    """The LM head of a tied model: the (last stage's copy of the) input embedding, transposed."""
    return parallel_lm_logits(h, embedding.weight, embedding.parallel)


def _pipe_loss(parallel: ParallelState, logits: torch.Tensor, labels: torch.Tensor
               ) -> torch.Tensor:
    """The training loss of a micro-batch, as without a pipeline: :func:`mean_loss` of the
    per-token vocab-parallel cross entropy."""
    return mean_loss(vocab_parallel_cross_entropy(logits, labels, parallel), labels)


class PipeEmbedding(VocabParallelEmbedding):
    """The embedding of a pipeline whose micro-batches carry extras:
    ``(tokens, *extras) -> (hidden, *extras)``."""

    def forward(self, inputs):
        tokens, *extras = inputs
        return (super().forward(tokens), *extras)


class PipeTransformerBlock(TransformerBlock):
    """A block of such a pipeline: ``(hidden, *extras) -> (block(hidden, **extras), *extras)``,
    the extras named by ``fields`` (``position_ids``, ``segment_ids``)."""

    def __init__(self, *args, fields: tuple[str, ...], **kwargs):
        super().__init__(*args, **kwargs)
        self.fields = tuple(fields)

    def forward(self, inputs):
        h, *extras = inputs
        return (super().forward(h, **dict(zip(self.fields, extras))), *extras)


class _DropExtras:
    def forward(self, inputs):
        return super().forward(inputs[0])  # the last stage's norm: the hidden states go on alone


class PipeRMSNorm(_DropExtras, RMSNorm):
    """The final RMSNorm of such a pipeline: ``(hidden, *extras) -> norm(hidden)``."""


class PipeLayerNorm(_DropExtras, LayerNorm):
    """The final LayerNorm of such a pipeline: ``(hidden, *extras) -> norm(hidden)``."""


_PIPE_NORMS = {RMSNorm: PipeRMSNorm, LayerNorm: PipeLayerNorm}


def pipeline_specs(model_cfg: ModelConfig, vocab_size: int,
                   parallel: ParallelState, fields: tuple[str, ...] = ()) -> list:
    """The layer sequence of :class:`~megatron_qsparse.model.gpt.GPTModel` as DeepSpeed layer specs.

    Index 0 the embedding, ``1..L`` the blocks, ``L+1`` the final norm, ``L+2`` the LM head: a
    :class:`~deepspeed.pipe.TiedLayerSpec` sharing the embedding (its gradient is all-reduced
    between the first and last stage) or, untied, its own column-parallel matrix. Checkpoints
    hold one file per index (``layer_XX-model_YY-model_states.pt``), whatever the stage count.
    ``fields``: the extra tensors the micro-batches carry (see the module docstring).
    """
    from deepspeed.pipe import LayerSpec, TiedLayerSpec

    std = model_cfg.init_method_std
    h = model_cfg.hidden_size
    embed = (PipeEmbedding if fields else VocabParallelEmbedding, vocab_size, h, std)
    tied = not model_cfg.untie_embeddings_and_output_weights
    specs = [TiedLayerSpec(PIPE_EMBED_KEY, *embed, parallel=parallel, tied_weight_attr="weight")
             if tied else LayerSpec(*embed, parallel=parallel)]
    if fields:
        specs += [LayerSpec(PipeTransformerBlock, model_cfg, i, parallel, fields=tuple(fields))
                  for i in range(model_cfg.num_layers)]
    else:
        specs += [LayerSpec(TransformerBlock, model_cfg, i, parallel)
                  for i in range(model_cfg.num_layers)]
    norm = type(build_norm(model_cfg))
    specs.append(LayerSpec(_PIPE_NORMS[norm] if fields else norm, h, model_cfg.norm_epsilon))
    if tied:
        specs.append(TiedLayerSpec(PIPE_EMBED_KEY, *embed, parallel=parallel,
                                   forward_fn=_tied_lm_head, tied_weight_attr="weight"))
    else:
        specs.append(LayerSpec(ColumnParallelLinear, h, vocab_size, bias=False, sparsifier=None,
                               init_method_std=std, parallel=parallel))
    return specs


def pipeline_layer_names(model_cfg: ModelConfig) -> dict[int, str]:
    """Spec index -> the :class:`~megatron_qsparse.model.gpt.GPTModel` prefix of its parameters
    (checkpoint conversion)."""
    L = model_cfg.num_layers
    names = {0: "embedding.", L + 1: "final_norm."}
    names.update({1 + i: f"layers.{i}." for i in range(L)})
    if model_cfg.untie_embeddings_and_output_weights:
        names[L + 2] = "output_layer."
    return names


def build_pipeline_model(model_cfg: ModelConfig, vocab_size: int,
                         parallel: ParallelState, *, init_seed: int,
                         partition_method: str = "uniform", fields: tuple[str, ...] = ()):
    """This rank's stage of the model as a ``deepspeed.pipe.PipelineModule``.

    Stages follow ``parallel.topology``; ``partition_method`` ``uniform`` gives every stage the same
    number of transformer blocks (the first also holds the embedding, the last the norm and the
    head), ``parameters`` balances parameter counts. Layer ``i`` is initialised from
    ``init_seed + i`` (as :class:`~megatron_qsparse.model.gpt.GPTModel` with the same
    ``init_seed``). Full recomputation (``--recompute-granularity full``) checkpoints every block.
    ``fields``: the extra tensors of packed micro-batches (``position_ids``, ``segment_ids``),
    which then flow through every stage.
    """
    from deepspeed.pipe import PipelineModule

    full = model_cfg.resolved_recompute() == "full"
    method = "type:TransformerBlock" if partition_method == "uniform" else partition_method
    specs = pipeline_specs(model_cfg, vocab_size, parallel, fields)
    module = PipelineModule(
        layers=specs,
        topology=parallel.topology, loss_fn=functools.partial(_pipe_loss, parallel),
        seed_layers=True, base_seed=init_seed, seed_fn=torch.manual_seed,
        partition_method=method, activation_checkpoint_interval=1 if full else 0,
        activation_checkpoint_func=functools.partial(checkpoint, state=parallel),
        checkpointable_layers=["TransformerBlock", "PipeTransformerBlock"])
    module.config, module.vocab_size = model_cfg, vocab_size
    module.qsparse_config = model_cfg.qsparse
    module.pipeline_state = parallel
    last = len(specs) - 1
    start = module.partitions()[module.stage_id]  # this stage's first spec index
    for idx, fn in enumerate(module.forward_funcs):
        if idx + start == last and isinstance(fn, ColumnParallelLinear):
            fn.is_lm_head = True
    if parallel.pp_rank > 0:  # the first stage owns the tied embedding
        for tied in module.tied_modules.values():
            for p in tied.parameters():
                p.pipeline_duplicate = True
    return module


__all__ = ["PIPE_EMBED_KEY", "PipeEmbedding", "PipeTransformerBlock", "build_pipeline_model",
           "pipeline_layer_names", "pipeline_specs"]
