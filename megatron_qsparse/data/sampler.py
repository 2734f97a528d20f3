"""Data-parallel micro-batch sampling that resumes from ``consumed_samples`` (Megatron-LM semantics)."""

from __future__ import annotations

import logging
from typing import Iterator

import numpy as np
import torch

logger = logging.getLogger(__name__)


class MegatronPretrainingSampler:
    """Batch sampler: this rank's micro-batch from each global micro-batch, in dataset order.

    Samples ``consumed_samples, consumed_samples + 1, ...`` are grouped into global micro-batches
    of ``micro_batch_size * data_parallel_size`` consecutive indices; rank ``r`` gets the slice
    ``[r * micro_batch_size, (r + 1) * micro_batch_size)`` of each. The dataset itself is already
    shuffled, so no shuffling happens here, and resuming at ``consumed_samples`` continues exactly
    where an interrupted run stopped, whatever the data-parallel size was.

    Args:
        total_samples: length of the dataset.
        consumed_samples: samples already used by all ranks together (resume point).
        micro_batch_size: samples per micro-batch per rank.
        data_parallel_rank: this rank's index in the data-parallel group.
        data_parallel_size: number of data-parallel ranks.
        drop_last: drop an incomplete final global micro-batch (otherwise each rank gets what is
            left of its slice, possibly nothing).
    """

    def __init__(self, total_samples: int, consumed_samples: int, micro_batch_size: int,
                 data_parallel_rank: int, data_parallel_size: int, drop_last: bool = True):
        if total_samples <= 0:
            raise ValueError(f"no samples to draw from (total_samples={total_samples})")
        if micro_batch_size <= 0:
            raise ValueError(f"micro_batch_size must be positive, got {micro_batch_size}")
        if data_parallel_size <= 0:
            raise ValueError(f"data_parallel_size must be positive, got {data_parallel_size}")
        if not 0 <= data_parallel_rank < data_parallel_size:
            raise ValueError(f"data_parallel_rank {data_parallel_rank} is not in "
                             f"[0, {data_parallel_size})")
        if not 0 <= consumed_samples < total_samples:
            raise ValueError(f"consumed_samples {consumed_samples} is not below total_samples "
                             f"{total_samples}: the dataset is exhausted; build it with more "
                             f"samples (e.g. raise --train-iters)")
        self.total_samples = int(total_samples)
        self.consumed_samples = int(consumed_samples)
        self.micro_batch_size = int(micro_batch_size)
        self.data_parallel_rank = int(data_parallel_rank)
        self.data_parallel_size = int(data_parallel_size)
        self.drop_last = bool(drop_last)
        self.micro_batch_times_data_parallel_size = self.micro_batch_size * self.data_parallel_size

    def __len__(self) -> int:
        """Number of micro-batches this rank will yield."""
        remaining = self.total_samples - self.consumed_samples
        full, rest = divmod(remaining, self.micro_batch_times_data_parallel_size)
        if rest and not self.drop_last:
            start = self.data_parallel_rank * self.micro_batch_size
            full += int(rest > start)
        return full

    def __iter__(self) -> Iterator[list[int]]:
        start = self.data_parallel_rank * self.micro_batch_size
        end = start + self.micro_batch_size
        step = self.micro_batch_times_data_parallel_size
        first = self.consumed_samples
        while first + step <= self.total_samples:
            yield list(range(first + start, first + end))
            first += step
        if not self.drop_last and first < self.total_samples:
            tail = list(range(first + start, min(first + end, self.total_samples)))
            if tail:
                yield tail


def collate_tokens(samples: list[dict]) -> dict[str, torch.Tensor]:
    """Stack ``{"tokens": array}`` samples into ``{"tokens": LongTensor [batch, seq_length + 1]}``
    (and ``loss_mask``, ``position_ids``, ``segment_ids`` the same way when the samples have
    them: SFT data, packed sequences)."""
    out = {}
    for key in ("tokens", "loss_mask", "position_ids", "segment_ids"):
        if key in samples[0]:
            out[key] = torch.from_numpy(np.stack([np.asarray(s[key], dtype=np.int64)
                                                  for s in samples]))
    return out


def build_pretraining_data_loader(dataset, consumed_samples: int, micro_batch_size: int,
                                  dp_rank: int, dp_size: int,
                                  num_workers: int = 0) -> torch.utils.data.DataLoader | None:
    """DataLoader over ``dataset`` yielding this rank's micro-batches from ``consumed_samples`` on.

    Returns ``None`` when ``dataset`` is ``None`` (a split that is not used).
    """
    if dataset is None:
        return None
    sampler = MegatronPretrainingSampler(
        total_samples=len(dataset), consumed_samples=consumed_samples,
        micro_batch_size=micro_batch_size, data_parallel_rank=dp_rank,
        data_parallel_size=dp_size, drop_last=True)
    return torch.utils.data.DataLoader(
        dataset, batch_sampler=sampler, num_workers=num_workers, collate_fn=collate_tokens,
        pin_memory=torch.cuda.is_available(), persistent_workers=num_workers > 0)
