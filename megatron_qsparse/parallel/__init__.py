"""Megatron-style model-parallel building blocks (tensor parallelism: TP = 1 for now)."""

from megatron_qsparse.parallel.layers import (ColumnParallelLinear, RowParallelLinear,
                                              VocabParallelEmbedding)

__all__ = ["ColumnParallelLinear", "RowParallelLinear", "VocabParallelEmbedding"]
