"""Megatron-style model parallelism over ``torch.distributed`` (tensor parallelism; the topology
and the DeepSpeed ``mpu`` also hold the pipeline and data axes)."""

from megatron_qsparse.parallel.cross_entropy import vocab_parallel_cross_entropy
from megatron_qsparse.parallel.layers import (ColumnParallelLinear, RowParallelLinear,
                                              VocabParallelEmbedding, divide, full_numel,
                                              parallel_lm_logits)
from megatron_qsparse.parallel.mappings import (copy_to_tensor_parallel,
                                                gather_from_tensor_parallel,
                                                reduce_from_tensor_parallel,
                                                scatter_to_tensor_parallel)
from megatron_qsparse.parallel.sharding import gather_model_state_dict
from megatron_qsparse.parallel.sparsify import global_topk_mask, sparsify_sharded
from megatron_qsparse.parallel.state import (DeepSpeedMPU, ParallelDims, ParallelState,
                                             get_parallel_state, initialize_model_parallel,
                                             set_parallel_state)
from megatron_qsparse.parallel.utils import grad_norm, sum_squares_over_tp

__all__ = [
    "ColumnParallelLinear", "DeepSpeedMPU", "ParallelDims", "ParallelState", "RowParallelLinear",
    "VocabParallelEmbedding", "copy_to_tensor_parallel", "divide", "full_numel",
    "gather_from_tensor_parallel", "gather_model_state_dict",
    "get_parallel_state", "global_topk_mask", "grad_norm", "initialize_model_parallel",
    "parallel_lm_logits", "reduce_from_tensor_parallel", "scatter_to_tensor_parallel",
    "set_parallel_state", "sparsify_sharded", "sum_squares_over_tp",
    "vocab_parallel_cross_entropy",
]
