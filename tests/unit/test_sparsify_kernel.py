"""The compiled CPU sparsify kernels agree bit for bit with the pure-PyTorch reference.

Reference: ``x * topk_mask(x, k)`` / ``x * block_mask(x, n, m)`` (sparsity/methods/). The kernel is
built once per machine (cached; the first build takes ~30-60 s) and once per test session at most;
if it cannot be built here, these tests skip with the reason.
"""

import logging

import pytest
import torch

from megatron_qsparse.config import QSparseConfig
from megatron_qsparse.sparsity import (DensityStats, block_mask, block_sparsify, build_sparsifier,
                                       collect_density, keep_count, kernels, topk_mask,
                                       topk_sparsify)

DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.float64]
_INT = {torch.float32: torch.int32, torch.float64: torch.int64, torch.bfloat16: torch.int16,
        torch.float16: torch.int16}


@pytest.fixture(scope="module", autouse=True)
def kernel():
    if not kernels.available():
        pytest.skip(f"sparsify kernel unavailable: {kernels.unavailable_reason()}")


def bits(t: torch.Tensor) -> torch.Tensor:
    """Integer view: equality of bits tells ``-0.0`` from ``0.0``."""
    return t.contiguous().view(_INT[t.dtype])


def masked(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``x * mask``, except that a dropped ±inf gives a signed zero (the product gives NaN)."""
    return torch.where(mask | x.isfinite(), x * mask, torch.zeros_like(x).copysign(x))


def assert_topk_matches(x: torch.Tensor, k: int) -> None:
    y, mask, nonzero = kernels.topk_sparsify(x, k, want_mask=True)
    ref_mask = topk_mask(x, k)
    ref = masked(x, ref_mask)
    assert torch.equal(mask, ref_mask)
    assert torch.equal(bits(y), bits(ref))
    assert nonzero == int(torch.count_nonzero(ref))
    y2, none, nz2 = kernels.topk_sparsify(x, k, want_mask=False)
    assert none is None and nz2 == nonzero and torch.equal(bits(y2), bits(y))


def data(kind: str, shape, dtype, seed=0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g, dtype=torch.float64)
    if kind == "rounded":  # few distinct magnitudes: many exact ties at the threshold
        x = (x * 2).round() / 2
    elif kind == "equal":  # all-equal rows, mixed signs
        x = torch.where(x > 0, 1.5, -1.5)
    elif kind == "zeros":  # mostly exact zeros of both signs, as after ReLU² or dropout
        x = torch.where(torch.rand(shape, generator=g, dtype=torch.float64) < 0.7, 0.0, x)
        x = torch.where(torch.rand(shape, generator=g, dtype=torch.float64) < 0.5, -x, x)
    elif kind == "relu2":  # up * relu(gate)^2, the down projection's input
        x = x * torch.relu(torch.randn(shape, generator=g, dtype=torch.float64)).square()
    elif kind == "wide":  # magnitudes over many octaves, infs and denormals included
        x = x * torch.exp2(torch.randint(-140, 120, shape, generator=g).double())
    return x.to(dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("kind", ["randn", "rounded", "equal", "zeros", "relu2", "wide"])
@pytest.mark.parametrize("d", [2, 3, 17, 128, 257, 1000])
def test_topk_matches_reference(dtype, kind, d):
    x = data(kind, (24, d), dtype, seed=d)
    ks = {1, d - 1} | {keep_count(d, s) for s in (0.1, 0.4, 0.5, 0.9)}
    for k in sorted(k for k in ks if 1 <= k < d):
        assert_topk_matches(x, k)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_topk_wide_rows_and_layouts(dtype):
    x = data("randn", (2, 3, 4096), dtype)
    assert_topk_matches(x, keep_count(4096, 0.4))
    assert_topk_matches(x[0, 0], 77)  # 1-D
    assert_topk_matches(data("rounded", (5, 11008), dtype), keep_count(11008, 0.5))
    # non-contiguous input: the kernel works on a contiguous copy
    xt = data("randn", (64, 48), dtype).t()
    y, _, _ = kernels.topk_sparsify(xt, 20)
    assert torch.equal(bits(y), bits(xt * topk_mask(xt, 20)))


def test_topk_signed_zero_and_infinities():
    x = torch.tensor([[-0.0, 0.0, -0.0, 1.0, -2.0, 0.0],
                      [float("inf"), -float("inf"), 1.0, -0.0, 3.0, -1.0],
                      [-0.0, -0.0, -0.0, -0.0, -0.0, -0.0]])
    for k in range(1, 6):
        assert_topk_matches(x, k)
    y, _, nz = kernels.topk_sparsify(x, 3)
    assert nz == 2 + 3 + 0
    assert torch.equal(torch.signbit(y[2]), torch.ones(6, dtype=torch.bool))


def test_topk_independent_of_threads_and_rows():
    x = data("rounded", (300, 96), torch.float32)
    prev = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = kernels.topk_sparsify(x, 40, True)
        torch.set_num_threads(max(2, prev))
        two = kernels.topk_sparsify(x, 40, True)
    finally:
        torch.set_num_threads(prev)
    assert torch.equal(bits(one[0]), bits(two[0])) and one[2] == two[2]
    part = kernels.topk_sparsify(x[7:8], 40)[0]
    assert torch.equal(bits(part), bits(one[0][7:8]))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("n,m", [(2, 4), (1, 4), (4, 8), (3, 3)])
def test_block_matches_reference(dtype, n, m):
    for kind in ("randn", "rounded", "zeros"):
        x = data(kind, (6, 2, 48), dtype)
        y, mask, nonzero = kernels.block_sparsify(x, n, m, want_mask=True)
        ref_mask = block_mask(x, n, m)
        assert torch.equal(mask, ref_mask)
        assert torch.equal(bits(y), bits(masked(x, ref_mask)))
        assert nonzero == int(torch.count_nonzero(masked(x, ref_mask)))


# ------------------------------------------------------------------ through the Sparsifier


def _run(x, use_kernel, **kw):
    """Output, input gradient and density of topk_sparsify on one path."""
    x = x.detach().clone().requires_grad_()
    stats = DensityStats()
    y = topk_sparsify(x, kw.pop("k"), stats=stats, use_kernel=use_kernel, **kw)
    g = torch.linspace(-1, 1, y.numel(), dtype=y.dtype).view(y.shape)
    y.backward(g)
    return y.detach(), x.grad, int(stats.nonzero), stats.total


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64], ids=str)
@pytest.mark.parametrize("ste", [True, False])
@pytest.mark.parametrize("rescale", ["none", "l2"])
def test_kernel_path_equals_fallback_path(dtype, ste, rescale):
    x = data("zeros", (4, 8, 40), dtype, seed=3)  # exact zeros among the kept entries too
    fast = _run(x, True, k=25, ste=ste, rescale=rescale)
    slow = _run(x, False, k=25, ste=ste, rescale=rescale)
    assert torch.equal(bits(fast[0]), bits(slow[0]))
    assert torch.equal(bits(fast[1]), bits(slow[1]))
    assert fast[2:] == slow[2:]


def test_block_path_equals_fallback_path():
    x = data("rounded", (5, 32), torch.float32)
    outs = []
    for use_kernel in (True, False):
        xx = x.clone().requires_grad_()
        stats = DensityStats()
        y = block_sparsify(xx, 2, 4, ste=False, stats=stats, use_kernel=use_kernel)
        y.backward(torch.ones_like(y))
        outs.append((bits(y.detach()), xx.grad, int(stats.nonzero)))
    assert torch.equal(outs[0][0], outs[1][0]) and torch.equal(outs[0][1], outs[1][1])
    assert outs[0][2] == outs[1][2]


def test_kernel_path_saves_nothing_under_ste():
    x = torch.randn(8, 64, requires_grad=True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        build_sparsifier(QSparseConfig(ratio=0.4), "qkv", 0)(x)
        build_sparsifier(QSparseConfig(mode="block", block="2:4"), "qkv", 0)(x)
        assert saved == []
        build_sparsifier(QSparseConfig(ratio=0.4, ste=False), "qkv", 0)(x)
    assert [t.dtype for t in saved] == [torch.bool]


def test_sparsifier_density_and_k_equal_d():
    s = build_sparsifier(QSparseConfig(ratio=0.5), "o", 0)
    x = data("zeros", (16, 30), torch.float32)
    y, ref = s(x), x * topk_mask(x, 15)
    assert collect_density(s)["kind/o"] == int(torch.count_nonzero(ref)) / x.numel()
    assert torch.equal(bits(y), bits(ref))
    s0 = build_sparsifier(QSparseConfig(ratio=0.0), "o", 0)
    assert s0(x) is x  # K = d: nothing to select


def test_disabled_kernel_falls_back_with_one_warning(monkeypatch, caplog):
    monkeypatch.setenv(kernels.ENV_ENABLE, "0")
    monkeypatch.setattr(kernels, "_tried", False)
    monkeypatch.setattr(kernels, "_module", None)
    with caplog.at_level(logging.WARNING, logger=kernels.__name__):
        x = data("rounded", (6, 20), torch.float32)
        y = build_sparsifier(QSparseConfig(ratio=0.5), "qkv", 0)(x)
        y = build_sparsifier(QSparseConfig(ratio=0.5), "qkv", 0)(x)
    assert not kernels.supports(x)
    assert [r.levelno for r in caplog.records] == [logging.WARNING]
    assert "MEGATRON_QSPARSE_KERNELS=0" in caplog.records[0].getMessage()
    assert torch.equal(y, x * topk_mask(x, 10))
