"""Top-K / block / ReLU sparsifiers, STE, rescale, int8 fake quant, density stats.

Every test runs twice: with the compiled CPU kernels (when they build here) and on the pure-PyTorch
path; tests/unit/test_sparsify_kernel.py compares the two directly.
"""

import math

import pytest
import torch

from megatron_qsparse.config import QSparseConfig
from megatron_qsparse.sparsity import (Sparsifier, apply_mask, block_mask, build_sparsifier,
                                       collect_density, keep_count, kernels, quantize_int8,
                                       recording, reset_density, set_sparsity_scale, topk_mask)


@pytest.fixture(autouse=True, params=["kernel", "pytorch"])
def sparsify_path(request):
    """Run the test with the compiled kernels switched on (if available), then off."""
    with kernels.use_kernels(request.param == "kernel"):
        yield request.param


def reference_mask(x: torch.Tensor, k: int) -> torch.Tensor:
    """Naive: stable descending sort of |x|, first k indices (ties -> lower index)."""
    idx = x.abs().float().sort(dim=-1, descending=True, stable=True).indices[..., :k]
    return torch.zeros_like(x, dtype=torch.bool).scatter_(-1, idx, True)


def sparsifier(**kw) -> Sparsifier:
    kind = kw.pop("kind", "qkv")
    return build_sparsifier(QSparseConfig(**kw), kind, 0)


# ---------------------------------------------------------------- keep count and mask


@pytest.mark.parametrize("d,ratio,k", [(10, 0.4, 6), (10, 0.7, 3), (100, 0.29, 71), (128, 0.4, 77),
                                       (4096, 0.4, 2458), (8, 0.0, 8), (8, 0.99, 1), (1, 0.5, 1)])
def test_keep_count(d, ratio, k):
    assert keep_count(d, ratio) == k


def test_keep_count_rejects_bad_ratio():
    with pytest.raises(ValueError):
        keep_count(8, 1.5)


@pytest.mark.parametrize("shape", [(7,), (3, 17), (2, 5, 64), (4, 1, 3, 33), (0, 16)])
@pytest.mark.parametrize("ratio", [0.0, 0.1, 0.4, 0.5, 0.6, 0.99])
def test_exact_k_per_row_and_matches_reference(shape, ratio):
    g = torch.Generator().manual_seed(hash((shape, ratio)) % 2**31)
    x = torch.randn(shape, generator=g)
    k = keep_count(shape[-1], ratio)
    mask = topk_mask(x, k)
    assert mask.shape == x.shape and mask.dtype == torch.bool
    assert (mask.sum(-1) == k).all()
    assert torch.equal(mask, reference_mask(x, k))


def test_ties_go_to_lower_index():
    x = torch.ones(3, 10)
    assert torch.equal(topk_mask(x, 4), torch.arange(10).expand(3, 10) < 4)
    x = torch.tensor([[1.0, -3.0, 2.0, -2.0, 2.0, 0.5]])
    assert topk_mask(x, 3).tolist() == [[False, True, True, True, False, False]]
    assert topk_mask(x, 2).tolist() == [[False, True, True, False, False, False]]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_ties_from_rounding_match_reference(dtype):
    g = torch.Generator().manual_seed(0)
    for d in (16, 64, 257):
        x = (torch.randn(64, d, generator=g) * 4).round() / 4  # many exact ties
        x = x.to(dtype)
        for ratio in (0.25, 0.4, 0.75):
            k = keep_count(d, ratio)
            mask = topk_mask(x, k)
            assert (mask.sum(-1) == k).all()
            assert torch.equal(mask, reference_mask(x, k))


def test_mask_independent_of_batch_layout():
    x = (torch.randn(32, 48) * 2).round()
    full = topk_mask(x, 20)
    parts = torch.cat([topk_mask(x[i:i + 5], 20) for i in range(0, 32, 5)])
    assert torch.equal(full, parts)
    assert torch.equal(topk_mask(x.view(4, 8, 48), 20).view(32, 48), full)


def test_k_equal_d_keeps_all():
    assert topk_mask(torch.randn(3, 5), 5).all()


# ---------------------------------------------------------------- STE and gradients


def test_ste_gradient_is_identity_float64():
    s = sparsifier(ratio=0.5)
    x = torch.randn(3, 12, dtype=torch.float64)
    jac = torch.autograd.functional.jacobian(s, x)
    assert torch.equal(jac.reshape(36, 36), torch.eye(36, dtype=torch.float64))


def _no_near_ties(shape):
    # distinct magnitudes at least 0.01 apart: finite differences never flip the mask
    n = math.prod(shape)
    mags = (torch.randperm(n, dtype=torch.float64) + 1) * 0.01
    signs = torch.where(torch.rand(n) < 0.5, -1.0, 1.0).double()
    return (mags * signs).view(shape).requires_grad_()


def test_no_ste_gradcheck_and_mask_gradient():
    s = sparsifier(ratio=0.4, ste=False)
    x = _no_near_ties((4, 10))
    assert torch.autograd.gradcheck(s, (x,), eps=1e-6, atol=1e-8)
    y = s(x)
    g = torch.randn_like(y)
    y.backward(g)
    mask = topk_mask(x.detach(), 6)
    assert torch.equal(x.grad, g * mask)


def test_rescale_preserves_l2_norm_and_scales_ste_grad():
    s = sparsifier(ratio=0.6, rescale="l2")
    x = torch.randn(5, 32, dtype=torch.float64, requires_grad=True)
    y = s(x)
    assert torch.allclose(y.norm(dim=-1), x.norm(dim=-1))
    assert ((y != 0).sum(-1) == keep_count(32, 0.6)).all()
    y.sum().backward()
    factor = x.detach().norm(dim=-1, keepdim=True) / (x.detach() * topk_mask(x, 13)).norm(
        dim=-1, keepdim=True)
    assert torch.allclose(x.grad, factor.expand_as(x))
    zero = torch.zeros(2, 8)
    assert torch.equal(apply_mask(zero, topk_mask(zero, 3), rescale="l2"), zero)


def _saved_numels(fn, x):
    sizes = []

    def pack(t):
        sizes.append(t.numel())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn(x)
    return sizes


def test_ste_saves_no_tensors():
    x = torch.randn(8, 64, requires_grad=True)
    assert _saved_numels(sparsifier(ratio=0.4), x) == []
    assert _saved_numels(sparsifier(ratio=0.4, quantize_activations=True), x) == []
    assert _saved_numels(sparsifier(mode="block", block="2:4"), x) == []
    # rescale keeps one factor per token, never an input-sized tensor
    assert all(n < x.numel() for n in _saved_numels(sparsifier(ratio=0.4, rescale="l2"), x))
    # without STE only the bool mask is kept
    sizes = []

    def pack(t):
        sizes.append(t.dtype)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        sparsifier(ratio=0.4, ste=False)(x)
    assert sizes == [torch.bool]


# ---------------------------------------------------------------- other modes


def test_block_nm_counts_and_ties():
    x = torch.randn(6, 32)
    m = block_mask(x, 2, 4)
    assert (m.view(6, 8, 4).sum(-1) == 2).all()
    ref = torch.cat([reference_mask(x[:, i:i + 4], 2) for i in range(0, 32, 4)], dim=1)
    assert torch.equal(m, ref)
    assert block_mask(torch.ones(1, 8), 1, 4).tolist() == [[True, False, False, False] * 2]
    y = sparsifier(mode="block", block="2:4")(x)
    assert torch.equal(y, x * m)


def test_block_rejects_indivisible_width():
    with pytest.raises(ValueError, match="--qsparse-block"):
        sparsifier(mode="block", block="2:4")(torch.randn(2, 10))


def test_relu_mode_and_gradient():
    x = torch.randn(4, 16, requires_grad=True)
    y = sparsifier(mode="relu")(x)
    assert torch.equal(y, torch.relu(x))
    y.sum().backward()
    assert torch.equal(x.grad, (x > 0).float())


def test_none_mode_is_identity():
    x = torch.randn(4, 16)
    s = sparsifier(mode="none")
    assert s(x) is x
    assert collect_density(s)["kind/qkv"] == 1.0
    reset_density(s)
    x[0, :4] = 0.0
    s(x)
    assert collect_density(s)["kind/qkv"] == pytest.approx(1.0 - 4 / 64)  # natural density


def test_int8_quant_values_and_range():
    x = torch.tensor([[1.0, -0.5, 0.25, 0.0], [-254.0, 100.0, 3.0, 0.4]])
    q = quantize_int8(x, eps=0.0)
    assert torch.allclose(q[0], torch.tensor([1.0, -64 / 127, 32 / 127, 0.0]))
    # grid step 2: 100 -> level 50, 3 -> 1.5 -> 2 (half to even), 0.4 -> 0
    assert torch.allclose(q[1], torch.tensor([-254.0, 100.0, 4.0, 0.0]))
    x = torch.randn(16, 64, requires_grad=True)
    q = quantize_int8(x)
    gamma = x.detach().abs().amax(-1, keepdim=True) + 1e-5
    levels = q.detach() * 127 / gamma
    assert torch.allclose(levels, levels.round(), atol=1e-3)
    assert levels.abs().max() <= 127 + 1e-3
    q.sum().backward()
    assert torch.equal(x.grad, torch.ones_like(x))


def test_quantized_topk_keeps_k_of_quantized_values():
    x = torch.randn(8, 40)
    y = sparsifier(ratio=0.5, quantize_activations=True)(x)
    q = quantize_int8(x)
    assert torch.equal(y, q * topk_mask(q, 20))


def test_warmup_scale_and_per_kind_ratio():
    cfg = QSparseConfig(ratio=0.5, down_ratio=0.8)
    model = torch.nn.ModuleList([build_sparsifier(cfg, "qkv", 0), build_sparsifier(cfg, "down", 0)])
    x = torch.randn(3, 20)
    assert ((model[0](x) != 0).sum(-1) == 10).all()
    assert ((model[1](x) != 0).sum(-1) == 4).all()
    set_sparsity_scale(model, 0.0)
    assert torch.equal(model[0](x), x)
    set_sparsity_scale(model, 0.5)
    assert ((model[0](x) != 0).sum(-1) == 20 - 5).all()
    assert ((model[1](x) != 0).sum(-1) == 20 - 8).all()
    with pytest.raises(ValueError):
        set_sparsity_scale(model, 1.5)


# ---------------------------------------------------------------- density stats


def test_density_stats_exact_and_recording_switch():
    cfg = QSparseConfig(ratio=0.4)
    model = torch.nn.ModuleList([build_sparsifier(cfg, "qkv", 0), build_sparsifier(cfg, "qkv", 1),
                                 build_sparsifier(cfg, "o", 1)])
    x = torch.randn(5, 30)
    for m in model:
        m(x)
    d = collect_density(model)
    assert d == {"kind/qkv": 18 / 30, "kind/o": 18 / 30, "layer0/qkv": 18 / 30,
                 "layer1/qkv": 18 / 30, "layer1/o": 18 / 30}
    with recording(model, False):
        model[0](torch.zeros(5, 30))
    assert collect_density(model)["layer0/qkv"] == 18 / 30
    model[0](torch.zeros(5, 30))  # recording restored: zeros halve layer 0's density
    assert collect_density(model)["layer0/qkv"] == pytest.approx(9 / 30)
    reset_density(model)
    assert collect_density(model) == {}
