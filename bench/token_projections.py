"""One token's projections of the 378M LLaMA of ``bench/bench_llamacpp.py`` (8 layers x qkv
2048→3072, o 2048→2048, gate/up 2048→11264, down 5632→2048), each layer its own input-major
weights so they come from DRAM: shared by ``bench_int8_path.py`` and ``bench_kept_rows.py``."""

from __future__ import annotations

import torch

from megatron_qsparse.inference import cpu_kernels

SHAPES = [(2048, 3072), (2048, 2048), (2048, 11264), (5632, 2048)]
LAYERS = 8


def weights(dtype: torch.dtype, g: torch.Generator) -> list[tuple[torch.Tensor, torch.Tensor | None]]:
    """``(wt, scale)`` per projection, layer-major; int8 with per-output-channel scales."""
    out = []
    for _ in range(LAYERS):
        for d, n in SHAPES:
            w = torch.randn(d, n, generator=g)
            if dtype == torch.int8:
                q, scale = cpu_kernels.quantize_int8(w)
            else:
                q, scale = w.to(dtype).contiguous(), None
            out.append((cpu_kernels.on_huge_pages(q), scale))
    return out


def kernels_ready(threads: int) -> bool:
    """Set the thread count; False (and say so) without the compiled kernels."""
    torch.set_num_threads(threads)
    if not cpu_kernels.available():
        print(f"decode kernels unavailable ({cpu_kernels.unavailable_reason()}); nothing to do")
        return False
    return True
