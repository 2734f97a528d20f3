"""Cut full (TP = 1) tensors into tensor-parallel shards and join them back.

A sharded parameter is split along ``partition_dim``; the full tensor along that dim is made of
parts ``partition_sizes`` (one part for a plain layer; ``[q, k, v]`` or ``[gate, up]`` for a
fused one), and each part is split into ``tp`` contiguous chunks. TP rank ``r`` holds chunk ``r``
of every part, concatenated: e.g. the fused QKV shard of rank ``r`` is
``[q heads of rank r; k heads of its query groups; v heads of its query groups]``.

Only tensors are cut here, from the partition attributes the parallel layers set on their
parameters (:func:`partition_spec`); whole model state dicts are partitioned by
:mod:`megatron_qsparse.model.sharding`, which knows the model.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.distributed as dist


def shard_tensor(full: torch.Tensor, dim: int, sizes: Sequence[int], rank: int,
                 count: int) -> torch.Tensor:
    """Rank ``rank``'s shard (of ``count``) of ``full`` along ``dim`` with fused parts ``sizes``."""
    if full.shape[dim] != sum(sizes):
        raise ValueError(f"tensor of size {full.shape[dim]} along dim {dim} does not match the "
                         f"parts {tuple(sizes)}")
    pieces = []
    for part in full.split(list(sizes), dim=dim):
        if part.shape[dim] % count:
            raise ValueError(f"part of size {part.shape[dim]} is not divisible by the "
                             f"tensor-parallel size {count}")
        pieces.append(part.chunk(count, dim=dim)[rank])
    return torch.cat(pieces, dim=dim).contiguous()


def merge_shards(shards: Sequence[torch.Tensor], dim: int, sizes: Sequence[int]) -> torch.Tensor:
    """Inverse of :func:`shard_tensor`: the full tensor from the shards of every rank, in order."""
    count = len(shards)
    local = [s // count for s in sizes]
    per_rank = [s.split(local, dim=dim) for s in shards]
    return torch.cat([torch.cat([p[i] for p in per_rank], dim=dim) for i in range(len(sizes))],
                     dim=dim)


def partition_spec(p: torch.Tensor) -> tuple[int, tuple[int, ...]] | None:
    """``(partition_dim, partition_sizes)`` of a tensor-parallel parameter, None when every rank
    holds all of it (the attributes the parallel layers set on their parameters)."""
    if getattr(p, "partition_count", 1) > 1:
        return p.partition_dim, p.partition_sizes
    return None


def gather_tensor(t: torch.Tensor, param: torch.Tensor, state) -> torch.Tensor:
    """The full tensor of which ``t`` (e.g. ``param`` or ``param.grad``) is this rank's shard,
    all-gathered over the TP group (a replicated ``param`` returns ``t``)."""
    spec = partition_spec(param)
    if spec is None:
        return t
    dim, sizes = spec
    t = t.detach().contiguous()
    parts = [torch.empty_like(t) for _ in range(state.tp_size)]
    dist.all_gather(parts, t, group=state.tp_group)
    return merge_shards(parts, dim, sizes)


def gather_model_state_dict(model: torch.nn.Module, state, grads: bool = False) -> dict:
    """Full (TP = 1 layout) parameters — or their gradients with ``grads=True`` — of a TP model,
    on every TP rank. Every TP rank must call it."""
    out = {}
    for name, p in model.named_parameters():
        t = p.grad if grads else p
        if t is None:
            continue
        out[name] = gather_tensor(t, p, state)
    return out


__all__ = ["gather_model_state_dict", "gather_tensor", "merge_shards", "partition_spec",
           "shard_tensor"]
