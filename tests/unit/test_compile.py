"""torch.compile of a Q-Sparse transformer block, forward + backward, with ``fullgraph=True``:
every sparsifier method and modifier traces (the kernels are ``torch.library`` ops), the sparsity
warm-up changes K every step without recompiling (K is a device tensor), and outputs, gradients
and measured densities equal eager execution (fp32; the compiled norms and matmuls may sum in
another order, so values agree to 1e-5, and the kept sets are the same).

On CUDA, the same step also runs under ``torch.cuda.set_sync_debug_mode("error")``: no host
synchronisation in forward or backward.
"""

from __future__ import annotations

import pytest
import torch
import torch._dynamo
import torch._dynamo.testing

from megatron_qsparse.config import ModelConfig, QSparseConfig
from megatron_qsparse.model.transformer import TransformerBlock
from megatron_qsparse.parallel.state import ParallelState
from megatron_qsparse.sparsity import collect_density, reset_density, set_sparsity_scale

pytestmark = pytest.mark.slow  # inductor compiles: ~5 s per variant


def _tables(layers: int = 1) -> dict:
    table = [0.0] + [1e-3 * 10 ** (3 * i / 100) for i in range(1, 101)]
    return {"method": "threshold", "levels": 100, "tokens": 0,
            "thresholds": {f"layer{i}/{k}": table for i in range(layers)
                           for k in ("qkv", "o", "gate_up", "down")}}


VARIANTS = {
    "topk": dict(ratio=0.4),
    "topk-per-kind": dict(ratio=0.5, o_ratio=0.3, down_ratio=0.7),
    "topk-no-ste": dict(ratio=0.5, ste=False),
    "topk-int8": dict(ratio=0.5, quantize_activations=True),
    "topk-l2": dict(ratio=0.6, rescale="l2"),
    "bitnet-topk": dict(ratio=0.4, bitnet=True),
    "block-2:4": dict(mode="block", block="2:4"),
    "block-no-ste": dict(mode="block", block="2:4", ste=False),
    "relu": dict(mode="relu"),
    "none": dict(mode="none"),
    "threshold": dict(mode="threshold", ratio=0.9, o_ratio=0.6, down_ratio=0.1,
                      calibration=_tables()),
}
WARMUP = {"topk", "topk-per-kind", "topk-no-ste", "topk-int8", "topk-l2", "bitnet-topk"}


def _blocks(q: QSparseConfig):
    cfg = ModelConfig(num_layers=2, hidden_size=64, num_attention_heads=4, num_query_groups=2,
                      seq_length=16, ffn_hidden_size=128).with_sparsity(q)
    torch.manual_seed(0)
    eager = TransformerBlock(cfg, 0, ParallelState.single())
    compiled = TransformerBlock(cfg, 0, ParallelState.single())
    compiled.load_state_dict(eager.state_dict())
    return eager, compiled


def _step(block, x, scale):
    set_sparsity_scale(block, scale)
    reset_density(block)
    xi = x.clone().requires_grad_()
    block.zero_grad()
    y = block(xi)
    (y * torch.linspace(-1, 1, y.shape[-1])).sum().backward()
    grads = {n: p.grad.clone() for n, p in block.named_parameters()}
    return y.detach(), xi.grad, grads, collect_density(block)


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_block_compiles_fullgraph_and_matches_eager(variant):
    torch._dynamo.reset()
    eager, compiled = _blocks(QSparseConfig(**VARIANTS[variant]))
    counter = torch._dynamo.testing.CompileCounterWithBackend("inductor")
    compiled.compile(fullgraph=True, backend=counter)
    g = torch.Generator().manual_seed(1)
    scales = [0.25, 0.5, 0.75, 1.0, 1.0, 1.0] if variant in WARMUP else [1.0] * 4
    for step, scale in enumerate(scales):
        x = torch.randn(2, 16, 64, generator=g)
        want, got = _step(eager, x, scale), _step(compiled, x, scale)
        torch.testing.assert_close(got[0], want[0], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(got[1], want[1], rtol=1e-5, atol=1e-5)
        for name in want[2]:
            torch.testing.assert_close(got[2][name], want[2][name], rtol=1e-4, atol=1e-5,
                                       msg=f"{variant} step {step}: gradient of {name}")
        assert got[3] == want[3], f"{variant} step {step}: measured density differs"
    # one compilation, plus one when the density counters first become device tensors: the
    # warm-up's changing K does not recompile
    assert counter.frame_count <= 2, counter.frame_count


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("variant", ["topk", "topk-no-ste", "topk-int8", "block-2:4", "none"])
def test_cuda_step_never_synchronises(variant):
    eager, compiled = _blocks(QSparseConfig(**VARIANTS[variant]))
    compiled = compiled.cuda()
    compiled.compile(fullgraph=True)
    x = torch.randn(2, 16, 64, device="cuda")
    for scale in (0.5, 1.0):
        set_sparsity_scale(compiled, scale)  # outside the step (a fill_ on the device)
        compiled(x.requires_grad_()).sum().backward()  # compile first, outside the check
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(2):
            compiled(x).sum().backward()
    finally:
        torch.cuda.set_sync_debug_mode(0)
