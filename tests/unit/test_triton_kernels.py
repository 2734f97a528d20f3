"""The Triton kernels (``sparsity/triton_kernels.py``, ``inference/triton_kernels.py``) against
their PyTorch references, bit for bit (the decode GEMV: to a stated fp32 tolerance).

Where the tests run: with CUDA, on the GPU. Without it, on CPU tensors through Triton's
interpreter, so CI (no GPU) runs every kernel. The interpreter is chosen by ``TRITON_INTERPRET=1``,
read when a kernel is decorated, and Triton's own ``triton.language`` functions (``tl.sum``,
``tl.cumsum``...) are decorated when ``triton.language`` is first imported: the variable must be
set before Triton is first imported in the process. Importing torch, deepspeed, transformers or
this package imports no Triton, but ``torch.compile`` does (inductor probes for it, also on CPU),
and earlier test modules compile. Hence, without CUDA:

* ``tests/conftest.py`` sets ``TRITON_INTERPRET=1`` when it is imported, before any test module;
  with the variable set, ``torch.compile``'s CPU backend still works (checked), and on a machine
  without CUDA nothing else runs a Triton kernel;
* should Triton nevertheless have been imported in compiled mode (another conftest or harness, a
  plugin), every test here runs in ONE child process (this file under pytest with the variable
  set, started on the first test) and each test reports its own outcome there (``@interpreted``),
  so no test is skipped.

The interpreter is slow (one Python-level numpy op per Triton op), so the shapes are small: rows
<= 8, ``d`` in {7, 64, 130, 256}. Inputs are tie-heavy on purpose: an all-zero row, rows of mostly
exact ``±0``, small rounded integers (many ties at the threshold), a row of one repeated value of
mixed signs, plus Gaussian rows; ``k`` in {1, mid, d-1, d}. ``y`` is compared through its integer
view (so ``-0.0`` differs from ``0.0``), the mask with ``torch.equal``, ``nonzero`` with the
count of the reference.

Decode GEMV tolerance: ``|y - ref| <= 2e-6 · (|x_s| @ |W|) + 1e-6`` per output with the fp64 product
of the same sparsified input and weights as ``ref`` (fp32 accumulation in another order); another
choice of kept inputs would move ``y`` by whole weight rows, far outside it.
"""

from __future__ import annotations

import functools
import os
import subprocess
import sys
import tempfile
import xml.etree.ElementTree as ET

import pytest
import torch

CUDA = torch.cuda.is_available()
if not CUDA:
    os.environ["TRITON_INTERPRET"] = "1"  # in time if nothing imported Triton yet

triton = pytest.importorskip("triton")

from megatron_qsparse.inference import triton_kernels as gemv_module  # noqa: E402
from megatron_qsparse.sparsity import (block_mask, keep_count, quantize_int8,  # noqa: E402
                                       topk_mask)
from megatron_qsparse.sparsity import triton_kernels as tk  # noqa: E402
from megatron_qsparse.sparsity.methods.topk import _extreme  # noqa: E402
from tests.helpers import ROOT, clean_env  # noqa: E402

# Runs here: on CUDA, or when this process's Triton (its own library included) is interpreted.
IN_PROCESS = CUDA or not any(isinstance(f, triton.runtime.jit.JITFunction)
                             for f in (triton.language.sum, tk._topk_kernel,
                                       gemv_module._sparse_gemv))

_CHILD = "QSPARSE_TRITON_TEST_CHILD"


@functools.cache
def _child_outcomes() -> dict:
    """Run this file in a child process with the interpreter on: ``{test: failure or None}``."""
    with tempfile.TemporaryDirectory() as tmp:
        report = os.path.join(tmp, "report.xml")
        proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                               os.path.abspath(__file__), f"--junitxml={report}"],
                              env=clean_env(TRITON_INTERPRET="1", **{_CHILD: "1"}), cwd=ROOT,
                              capture_output=True, text=True, timeout=900)
        if not os.path.exists(report):
            raise RuntimeError(f"the child pytest wrote no report:\n{proc.stdout[-4000:]}"
                               f"\n{proc.stderr[-4000:]}")
        out = {}
        for case in ET.parse(report).getroot().iter("testcase"):
            bad = [e for e in case if e.tag in ("failure", "error", "skipped")]
            out[case.get("name")] = (f"{bad[0].tag}: {bad[0].get('message')}\n{bad[0].text}"
                                     if bad else None)
        return out


def interpreted(test):
    """Run ``test`` here, or (see the module docstring) report its outcome in the child process."""
    @functools.wraps(test)
    def run(*args, **kwargs):
        if IN_PROCESS:
            return test(*args, **kwargs)
        if os.environ.get(_CHILD):
            pytest.fail("Triton is not interpreted even in the child process")
        name = os.environ["PYTEST_CURRENT_TEST"].split("::")[-1].rsplit(" ", 1)[0]
        outcomes = _child_outcomes()
        if name not in outcomes:
            pytest.fail(f"{name} did not run in the child process")
        if outcomes[name] is not None:
            pytest.fail(f"in the child process (TRITON_INTERPRET=1): {outcomes[name]}")
    return run


DEVICE = "cuda" if CUDA else "cpu"
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
_INT = {torch.float32: torch.int32, torch.bfloat16: torch.int16, torch.float16: torch.int16}


def bits(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view(_INT[t.dtype])


def tie_heavy(d: int, dtype: torch.dtype, seed: int = 0) -> torch.Tensor:
    """``[8, d]``: Gaussian, all-zero, mostly ``±0``, rounded integers, one repeated value with
    mixed signs, tiny values, a sign pattern of ±1, and Gaussian again (scaled)."""
    g = torch.Generator().manual_seed(seed)
    r = torch.randn(8, d, generator=g)
    x = r.clone()
    x[1] = 0.0
    zeros = torch.rand(d, generator=g) < 0.7
    x[2] = torch.where(zeros, 0.0, r[2])
    x[2] = torch.where(torch.rand(d, generator=g) < 0.5, -x[2], x[2])  # -0.0 among them
    x[3] = (r[3] * 2).round()
    x[4] = torch.where(r[4] > 0, 0.75, -0.75)
    x[5] = r[5] * 1e-3
    x[6] = torch.where(r[6] > 0, 1.0, -1.0)
    x[7] = r[7] * 300.0
    return x.to(dtype).to(DEVICE)


def ks_for(d: int) -> list[int]:
    return sorted({1, keep_count(d, 0.5), max(1, d - 1), d})


def assert_sparsify_matches(got, ref_x: torch.Tensor, ref_mask: torch.Tensor, want_mask: bool):
    y, mask, nonzero = got
    ref = ref_x * ref_mask
    assert y.dtype == ref_x.dtype and y.shape == ref_x.shape
    assert torch.equal(bits(y), bits(ref)), f"{int((bits(y) != bits(ref)).sum())} entries differ"
    if want_mask:
        assert mask.dtype == torch.bool and torch.equal(mask, ref_mask)
    else:
        assert mask is None
    assert nonzero.dtype == torch.int64 and nonzero.dim() == 0
    assert nonzero.device == ref_x.device
    assert int(nonzero) == int(torch.count_nonzero(ref))


def k_tensor(k: int) -> torch.Tensor:
    return torch.tensor(k, dtype=torch.int64, device=DEVICE)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("d", [7, 64, 130, 256])
@interpreted
def test_topk_sparsify_bit_identical(dtype, d):
    x = tie_heavy(d, dtype, seed=d)
    for i, k in enumerate(ks_for(d)):
        want = i % 2 == 0
        assert_sparsify_matches(tk.topk_sparsify(x, k_tensor(k), want), x, topk_mask(x, k), want)
    # both mask settings give the same output
    k = keep_count(d, 0.5)
    a, b = tk.topk_sparsify(x, k_tensor(k), True), tk.topk_sparsify(x, k_tensor(k), False)
    assert torch.equal(bits(a[0]), bits(b[0])) and int(a[2]) == int(b[2])


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@interpreted
def test_topk_sparsify_layouts_and_signs(dtype):
    # 3-D and non-contiguous inputs; rows of signed zeros only
    x = tie_heavy(64, dtype).view(2, 4, 64)
    k = 20
    assert_sparsify_matches(tk.topk_sparsify(x, k_tensor(k), True), x, topk_mask(x, k), True)
    xt = tie_heavy(8, dtype).t()  # [8, 8], non-contiguous
    assert_sparsify_matches(tk.topk_sparsify(xt, k_tensor(3), True), xt, topk_mask(xt, 3), True)
    z = torch.tensor([[-0.0] * 6, [0.0, -0.0, 1.0, -1.0, 0.0, -2.0]], dtype=dtype, device=DEVICE)
    for k in (1, 3, 6):
        y, mask, nz = tk.topk_sparsify(z, k_tensor(k), True)
        assert_sparsify_matches((y, mask, nz), z, topk_mask(z, k), True)
        assert bool(torch.signbit(y[0]).all())


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("d", [7, 130])
@interpreted
def test_int8_topk_sparsify_bit_identical(dtype, d):
    x = tie_heavy(d, dtype, seed=3 * d)
    x[0, 0] = 0.5  # an exact .5 after scaling lands on a half-way point for some rows
    q = quantize_int8(x)
    for i, k in enumerate(ks_for(d)):
        want = i % 2 == 1
        got = tk.int8_topk_sparsify(x, k_tensor(k), want)
        assert_sparsify_matches(got, q, topk_mask(q, k), want)
    got = tk.int8_topk_sparsify(x, k_tensor(2), True, eps=0.25)
    q = quantize_int8(x, 0.25)
    assert_sparsify_matches(got, q, topk_mask(q, 2), True)


@interpreted
def test_int8_quantization_rounding_edges():
    # values whose scaled magnitude is an exact half-integer (round half to even, signed zero)
    row = torch.tensor([127.0, 0.5, 1.5, 2.5, -0.5, -1.5, -2.5, -0.25, 0.25, -0.0, 63.5, -126.5])
    x = torch.stack([row, row * 3.0, -row]).to(DEVICE)
    for eps in (0.0, 1e-5):
        q = quantize_int8(x, eps)
        assert_sparsify_matches(tk.int8_topk_sparsify(x, k_tensor(12), True, eps), q,
                                torch.ones_like(x, dtype=torch.bool), True)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("n,m", [(2, 4), (1, 4), (3, 8), (5, 5), (4, 4)])
@interpreted
def test_block_sparsify_bit_identical(dtype, n, m):
    d = {4: 64, 8: 64, 5: 130}[m]
    x = tie_heavy(d, dtype, seed=n * m)
    want = n % 2 == 0
    assert_sparsify_matches(tk.block_sparsify(x, n, m, want), x, block_mask(x, n, m), want)
    with pytest.raises(ValueError, match="d % m"):
        tk.block_sparsify(x[:, :7], n, 4, False)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@interpreted
def test_topk_candidates_multiset(dtype):
    for d in (7, 130):
        a = tie_heavy(d, dtype, seed=d).abs()
        for c in sorted({1, d // 2, d - 1, d}):
            for largest in (True, False):
                got = tk.topk_candidates(a, c, largest)
                ref = _extreme(a, c, largest)
                assert got.shape == (a.shape[0], c) and got.dtype == a.dtype
                assert torch.equal(bits(got.sort(-1).values), bits(ref.sort(-1).values))


@interpreted
def test_no_host_sync_contract_and_availability():
    assert tk.available()
    x = tie_heavy(64, torch.float32)
    k = k_tensor(10)
    y, mask, nz = tk.topk_sparsify(x, k, False)
    assert nz.device == x.device and mask is None
    if CUDA:  # the call itself must not synchronize
        torch.cuda.set_sync_debug_mode("error")
        try:
            tk.topk_sparsify(x, k, True)
            tk.int8_topk_sparsify(x, k, True)
            tk.block_sparsify(x, 2, 4, True)
        finally:
            torch.cuda.set_sync_debug_mode("default")


def assert_gemv_close(y: torch.Tensor, xs: torch.Tensor, wt: torch.Tensor, bias=None):
    x64, w64 = xs.double().cpu(), wt.double().cpu()
    ref = x64 @ w64 + (bias.double().cpu() if bias is not None else 0.0)
    tol = 2e-6 * (x64.abs() @ w64.abs()) + 1e-6
    assert y.dtype == torch.float32
    err = (y.double().cpu() - ref).abs()
    assert bool((err <= tol).all()), f"max excess {float((err - tol).max()):.3e}"


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@interpreted
def test_decode_gemv_matches_reference(dtype):
    d, n = 130, 150
    g = torch.Generator().manual_seed(5)
    wt = torch.randn(d, n, generator=g).to(dtype).to(DEVICE)
    bias = torch.randn(n, generator=g).to(dtype).to(DEVICE)
    x = tie_heavy(d, dtype)[[0, 3]]  # a Gaussian row and a tie-heavy row
    for k in (1, keep_count(d, 0.6), d):
        for b in (None, bias):
            y = gemv_module.gemv_topk(x, wt, k, b)
            assert y.shape == (2, n)
            assert_gemv_close(y, x * topk_mask(x, k), wt, b)
    one = gemv_module.gemv_topk(x[1].view(1, 1, d), wt, 40)  # one token, as DecodeLinear calls it
    assert one.shape == (1, 1, n)
    assert_gemv_close(one.view(1, n), x[1:] * topk_mask(x[1:], 40), wt)
    xs = tie_heavy(d, dtype)[[1, 2, 4]]  # all zero, mostly zero, dense
    y = gemv_module.gemv_nonzero(xs, wt, bias)
    assert_gemv_close(y, xs, wt, bias)
    # an fp32 activation with bf16 storage of the weight (DecodeLinear's weight_dtype)
    xf = tie_heavy(d, torch.float32)[[0]]
    wb = wt.to(torch.bfloat16)
    assert_gemv_close(gemv_module.gemv_topk(xf, wb, 50), xf * topk_mask(xf, 50), wb)
