"""The Q-Sparse method, independent of parallelism: sparsifiers, STE, quantizers, density stats.

``methods/`` holds one module per sparsifier (registered by ``--qsparse-mode`` name);
``sparsifier.py`` the module each projection holds; ``ste.py`` the straight-through pieces.
"""

from megatron_qsparse.sparsity.activations import ACTIVATIONS, relu2_glu, swiglu
from megatron_qsparse.sparsity.bitnet import int8_activation, ternary_weight
from megatron_qsparse.sparsity.methods import (SparsityMethod, describe, get_method,
                                               method_names, register, summary)
from megatron_qsparse.sparsity.masks import block_mask, topk_mask
from megatron_qsparse.sparsity.methods.block import block_sparsify
from megatron_qsparse.sparsity.methods.topk import keep_count, topk_sparsify
from megatron_qsparse.sparsity.sparsifier import (Sparsifier, build_sparsifier,
                                                  quantize_int8_sharded, set_sparsity_scale)
from megatron_qsparse.sparsity.stats import (DensityStats, collect_density, recording,
                                             reset_density, set_recording)
from megatron_qsparse.sparsity.ste import apply_mask, quantize_int8, straight_through

__all__ = [
    "ACTIVATIONS", "DensityStats", "Sparsifier", "SparsityMethod", "apply_mask", "block_mask",
    "block_sparsify", "build_sparsifier", "collect_density", "describe", "get_method",
    "int8_activation", "keep_count", "method_names", "quantize_int8", "quantize_int8_sharded",
    "recording", "register", "relu2_glu", "reset_density", "set_recording", "set_sparsity_scale",
    "straight_through", "summary", "swiglu", "ternary_weight", "topk_mask", "topk_sparsify",
]
