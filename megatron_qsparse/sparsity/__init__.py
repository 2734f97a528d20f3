"""The Q-Sparse method, independent of parallelism: sparsifiers, STE, quantizers, density stats."""

from megatron_qsparse.sparsity.activations import ACTIVATIONS, relu2_glu, swiglu
from megatron_qsparse.sparsity.bitnet import int8_activation, ternary_weight
from megatron_qsparse.sparsity.stats import (DensityStats, collect_density, recording,
                                             reset_density, set_recording)
from megatron_qsparse.sparsity.topk import (Sparsifier, apply_mask, block_mask, block_sparsify,
                                            build_sparsifier, keep_count, quantize_int8,
                                            set_sparsity_scale, straight_through, topk_mask,
                                            topk_sparsify)

__all__ = [
    "ACTIVATIONS", "DensityStats", "Sparsifier", "apply_mask", "block_mask", "block_sparsify",
    "build_sparsifier", "collect_density", "int8_activation", "keep_count", "quantize_int8",
    "recording", "relu2_glu", "reset_density", "set_recording", "set_sparsity_scale",
    "straight_through", "swiglu", "ternary_weight", "topk_mask", "topk_sparsify",
]
