"""Model-aware tensor-parallel partitioning of whole GPT state dicts.

The partition of every parameter (``(dim, sizes)`` or None, see
:mod:`megatron_qsparse.parallel.sharding`) is read from a shape-only
:class:`~megatron_qsparse.model.gpt.GPTModel` built on the ``meta`` device, so the layers stay the
one source of truth. :func:`shard_state_dict` / :func:`gather_state_dicts` convert full (TP = 1)
state dicts to the shards of every TP rank and back (equivalence tests, evaluation, checkpoint
conversion).
"""

from __future__ import annotations

from typing import Sequence

import torch

from megatron_qsparse.config import QSparseConfig
from megatron_qsparse.model.gpt import GPTModel
from megatron_qsparse.parallel.sharding import merge_shards, partition_spec, shard_tensor
from megatron_qsparse.parallel.state import ParallelState


def partition_specs(model_cfg, vocab_size: int, tp_size: int) -> dict:
    """``{name: (dim, sizes) or None}`` of every parameter of a GPT model at TP = ``tp_size``."""
    with torch.device("meta"):
        model = GPTModel(model_cfg.with_sparsity(QSparseConfig(mode="none")), vocab_size,
                         parallel=ParallelState.virtual_tp(tp_size, 0))
    return {n: partition_spec(p) for n, p in model.named_parameters()}


def shard_state_dict(full_sd: dict, tp_rank: int, tp_size: int, model_cfg) -> dict:
    """TP rank ``tp_rank``'s state dict from a full (TP = 1) GPT state dict."""
    specs = partition_specs(model_cfg, full_sd["embedding.weight"].shape[0], tp_size)
    out = {}
    for name, t in full_sd.items():
        spec = specs.get(name)
        out[name] = t if spec is None else shard_tensor(t, spec[0], spec[1], tp_rank, tp_size)
    return out


def gather_state_dicts(shard_sds: Sequence[dict], model_cfg) -> dict:
    """The full (TP = 1) GPT state dict from the state dicts of every TP rank, in rank order."""
    tp_size = len(shard_sds)
    vocab = shard_sds[0]["embedding.weight"].shape[0] * tp_size
    specs = partition_specs(model_cfg, vocab, tp_size)
    out = {}
    for name, t in shard_sds[0].items():
        spec = specs.get(name)
        out[name] = t if spec is None else merge_shards([sd[name] for sd in shard_sds], *spec)
    return out


__all__ = ["gather_state_dicts", "partition_specs", "shard_state_dict"]
