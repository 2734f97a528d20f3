"""Inference: generation with a KV cache and sparse decode kernels.

* :mod:`.cpu_kernels` — compiled sparse GEMV for one token (fused Top-K, any sparsifier, 2-bit
  BitNet), input-major weights, with a pure-PyTorch reference;
* :mod:`.triton_kernels` — the sparse GEMV as a Triton kernel for CUDA (imported only with a GPU);
* :mod:`.semi_structured` — 2:4 activations on sparse tensor cores for batched Block 2:4 inference;
* :mod:`.linear` — :class:`DecodeLinear`, the inference form of a sparse projection;
* :mod:`.model` — :class:`InferenceModel` with a preallocated :class:`KVCache`;
* :mod:`.generate` — greedy / temperature / top-p generation loop.
"""

from megatron_qsparse.inference.generate import Generation, generate, sample_next
from megatron_qsparse.inference.linear import DecodeLinear
from megatron_qsparse.inference.model import InferenceModel, KVCache, load_inference_model

__all__ = ["DecodeLinear", "Generation", "InferenceModel", "KVCache", "generate",
           "load_inference_model", "sample_next"]
