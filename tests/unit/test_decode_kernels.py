"""Sparse decode GEMV kernels against the dense matmul on the sparsified input.

Tolerance (fp32 accumulation in a different order): for every output ``j``,
``|y_j - ref_j| <= 2e-6 · sum_i |x_s,i · W_ji| + 1e-6`` (``ref`` in fp64 from the same weights;
plus a bf16 output rounding of ``2^-8 |ref_j|`` where the output is bf16/fp16). A different choice
of kept inputs (e.g. another tie break) would change ``y`` by whole weight rows, far outside it.
The CPU kernel is built once per machine (cached); without it these tests skip, with the reason.
The Triton GEMV runs on CUDA, or through Triton's interpreter on CPU tensors.
"""

from __future__ import annotations

import pytest
import torch

from megatron_qsparse.config import QSparseConfig
from megatron_qsparse.inference import cpu_kernels
from megatron_qsparse.inference.linear import DecodeLinear
from megatron_qsparse.parallel.layers import ColumnParallelLinear, RowParallelLinear
from megatron_qsparse.sparsity import build_sparsifier, keep_count, topk_mask


@pytest.fixture(scope="module", autouse=True)
def kernel():
    if not cpu_kernels.available():
        pytest.skip(f"decode kernel unavailable: {cpu_kernels.unavailable_reason()}")


def assert_close_to(y: torch.Tensor, xs: torch.Tensor, wt: torch.Tensor, bias=None,
                    int8: bool = False) -> None:
    """``y`` vs ``xs @ wt (+ bias)`` under the bound of the module docstring; ``int8``: the
    product of int8 weights, whose VNNI path quantizes each pass of eight kept activations to
    int16 (error <= 2^-16 of the pass's largest |x| per term, bounded here by the row's)."""
    x64, w64 = xs.double(), wt.double()
    ref = x64 @ w64
    scale = x64.abs() @ w64.abs()
    if bias is not None:
        ref = ref + bias.double()
    tol = 2e-6 * scale + 1e-6
    if int8 and cpu_kernels.int8_path() == "vnni":
        amax = x64.abs().amax(dim=-1, keepdim=True)
        tol = tol + 2.0 ** -16 * amax * w64.abs().sum(dim=0)
    if y.dtype in (torch.bfloat16, torch.float16):
        tol = tol + 2.0 ** -7 * ref.abs()
    err = (y.double() - ref).abs()
    assert bool((err <= tol).all()), f"max excess {float((err - tol).max()):.3e}"


def data(shape, seed, kind="randn"):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g)
    if kind == "rounded":  # many exact ties at the threshold
        x = (x * 2).round() / 2
    elif kind == "zeros":
        x = torch.where(torch.rand(shape, generator=g) < 0.6, 0.0, x)
    return x


WDTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.int8]


def stored(w: torch.Tensor, wdtype: torch.dtype):
    """``(wt, scale, dequantized fp32)`` of an input-major fp32 weight in a decode dtype."""
    if wdtype == torch.int8:
        q, scale = cpu_kernels.quantize_int8(w)
        return q, scale, cpu_kernels.dequantize(q, scale)
    wt = w.to(wdtype)
    return wt, None, wt.float()


@pytest.mark.parametrize("wdtype", WDTYPES, ids=str)
@pytest.mark.parametrize("xdtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
# shapes: tiny (one thread), one column block with many row groups (partials), several blocks,
# vector tails (n not a multiple of 16 / 64), n over the 4096-column chunk, two column blocks
# with row groups each (partials added per block)
@pytest.mark.parametrize("d,n", [(2, 1), (17, 5), (64, 33), (257, 100), (1000, 2050), (96, 4100),
                                 (3000, 72), (700, 4096 + 64 + 9), (200, 16384 + 80)])
def test_topk_gemv_matches_dense_reference(d, n, xdtype, wdtype, isa):
    wt, scale, w32 = stored(data((d, n), d * 7 + n), wdtype)
    for kind in ("randn", "rounded", "zeros"):
        x = data((3, d), d + n, kind).to(xdtype)
        for s in (0.0, 0.1, 0.4, 0.6, 0.9):
            k = keep_count(d, s)
            bias = data((n,), 5) if s == 0.4 else None
            y = cpu_kernels.gemv_topk(x, wt, k, bias, scale=scale)
            assert y.shape == (3, n) and y.dtype == torch.float32
            xs = x.float() * topk_mask(x, k)
            assert_close_to(y, xs, w32, bias, int8=wdtype == torch.int8)
            if s == 0.6:
                ref = cpu_kernels.gemv_topk(x, wt, k, bias, scale=scale, use_kernel=False)
                assert_close_to(ref, xs, w32, bias)


def test_gathers_at_every_length_and_on_special_values():
    """The kept-set gathers (16 entries per step with AVX-512, a masked tail) at every length
    across two vectors: -0.0 is not kept, NaN and inf are; Top-K ties at the threshold keep the
    lowest indices, also where the tie run crosses a vector boundary."""
    g = torch.Generator().manual_seed(5)
    for d in range(1, 41):
        w = torch.randn(d, 7, generator=g)
        x = torch.randn(d, generator=g)
        x[torch.rand(d, generator=g) < 0.4] = 0.0
        x[::5] = -0.0
        assert_close_to(cpu_kernels.gemv_nonzero(x, w), x, w)
        if d >= 3:
            y = x.clone()
            y[d // 2] = float("nan")
            assert bool(cpu_kernels.gemv_nonzero(y, w).isnan().all())
            y[d // 2] = float("inf")
            assert bool(cpu_kernels.gemv_nonzero(y, w).isinf().any())
        if d >= 2:
            ties = torch.full((d,), 0.5)  # every |x| equal: Top-K keeps the first k
            ties[1::2] = -0.5
            for k in {1, d // 2, d - 1} - {0}:
                xs = torch.where(torch.arange(d) < k, ties, torch.zeros(d))
                assert_close_to(cpu_kernels.gemv_topk(ties, w, k), xs, w)


def test_int8_quantization_is_per_output_channel():
    w = data((300, 40), 9)
    w[:, 3] = 0.0  # an all-zero column: scale 1, codes 0
    q, scale = cpu_kernels.quantize_int8(w)
    assert q.dtype == torch.int8 and scale.shape == (40,) and scale.dtype == torch.float32
    assert int(q.abs().max()) == 127 and float(scale[3]) == 1.0 and not q[:, 3].any()
    assert torch.allclose(scale, w.abs().amax(0).clamp_min(0) / 127.0 + (w.abs().amax(0) == 0))
    err = (cpu_kernels.dequantize(q, scale) - w).abs()
    assert bool((err <= scale / 2 + 1e-7).all())  # round to nearest code
    with pytest.raises(ValueError, match="scales"):
        cpu_kernels.dequantize(q)
    with pytest.raises(RuntimeError, match="scale"):
        cpu_kernels._EXT.module.gemv_nonzero(torch.randn(300), q, None, None)
    with pytest.raises(RuntimeError, match="int8 weights only"):
        cpu_kernels._EXT.module.gemv_nonzero(torch.randn(300), w, None, scale)


def test_fp16_weights_convert_exactly():
    """Every fp16 value, subnormals, inf and the largest finite included, reaches the sum as its
    exact fp32 value (vector path and scalar tail)."""
    bits = torch.arange(0, 1 << 16, dtype=torch.int32).to(torch.int16)
    h = bits.view(torch.float16)
    h = h[torch.isfinite(h)]
    n = h.numel()
    wt = h.view(1, n).contiguous()
    y = cpu_kernels.gemv_nonzero(torch.ones(1), wt)
    assert torch.equal(y, h.float())


def test_stream_read_sums():
    a = data((1 << 20,), 3)
    assert abs(cpu_kernels.stream_read(a) - float(a.double().sum())) < 1e-2


@pytest.mark.parametrize("threads", [1, 2])
def test_kept_rows_read_sums_exactly_the_kept_rows(threads):
    """The pattern read adds every word of every listed row once (a row left out or read twice
    changes the sum): row counts around the eight-row pass and the eight groups (128 rows), row lengths of one
    and several cache lines, repeated and unsorted indices."""
    g = torch.Generator().manual_seed(5)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        for row_bytes in (64, 192, 1024):
            buf = torch.randint(0, 256, (700, row_bytes), dtype=torch.uint8, generator=g)
            for nk in (1, 7, 8, 9, 15, 16, 17, 127, 128, 129, 300, 700):
                idx = torch.sort(torch.randperm(700, generator=g)[:nk]).values
                want = int(buf[idx].view(torch.int64).sum())
                assert cpu_kernels.kept_rows_read(buf, idx) == want, (row_bytes, nk)
            idx = torch.tensor([5, 3, 3, 699, 0, 5, 5, 5, 5, 1])
            assert cpu_kernels.kept_rows_read(buf, idx) == int(buf[idx].view(torch.int64).sum())
    finally:
        torch.set_num_threads(before)
    with pytest.raises(ValueError, match="multiple of 64"):
        cpu_kernels.kept_rows_read(torch.zeros(4, 100, dtype=torch.uint8), torch.tensor([0]))
    with pytest.raises(ValueError, match="contiguous"):  # no silent copy of the buffer
        cpu_kernels.kept_rows_read(torch.zeros(64, 4, dtype=torch.uint8).t(), torch.tensor([0]))
    with pytest.raises(RuntimeError, match="outside"):
        cpu_kernels.kept_rows_read(torch.zeros(4, 64, dtype=torch.uint8), torch.tensor([4]))


@pytest.mark.parametrize("mode", ["block", "relu", "quantized", "rescaled"])
def test_nonzero_gemv_after_any_sparsifier(mode):
    cfg = {"block": QSparseConfig(mode="block", block="2:4"),
           "relu": QSparseConfig(mode="relu"),
           "quantized": QSparseConfig(ratio=0.6, quantize_activations=True),
           "rescaled": QSparseConfig(ratio=0.5, rescale="l2")}[mode]
    sp = build_sparsifier(cfg, "o", 0)
    wt = data((256, 384), 1)
    xs = sp(data((2, 256), 2, "rounded"))
    assert_close_to(cpu_kernels.gemv_nonzero(xs, wt), xs, wt)


def test_dense_and_sparse_inputs_in_turn_share_the_kept_set():
    # one kept set serves the rows of a batch in turn: a row with no zero keeps every index and
    # writes the identity indices only when they are not already there, so a dense row after a
    # sparse one (compressed indices) must rewrite them
    d = 300
    wt = data((d, 70), 7)
    xs = data((6, d), 8)
    xs[1, ::3] = 0.0  # compressed indices
    xs[3, 5:] = 0.0   # a short kept set
    xs[4] = 0.0       # nothing kept
    assert_close_to(cpu_kernels.gemv_nonzero(xs, wt), xs, wt)
    assert_close_to(cpu_kernels.gemv_nonzero(xs[[1, 0]], wt), xs[[1, 0]], wt)


@pytest.mark.parametrize("wdtype", WDTYPES, ids=str)
@pytest.mark.parametrize("d,n", [(512, 3000), (4000, 300), (200, 16384 + 80)])  # groups, blocks
def test_kernel_is_independent_of_thread_count(d, n, wdtype, isa):
    wt, scale, _ = stored(data((d, n), 3), wdtype)
    x = data((d,), 4)
    prev = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = cpu_kernels.gemv_topk(x, wt, d // 3, scale=scale)
        torch.set_num_threads(2)
        two = cpu_kernels.gemv_topk(x, wt, d // 3, scale=scale)
        torch.set_num_threads(3)  # more threads than cores
        three = cpu_kernels.gemv_topk(x, wt, d // 3, scale=scale)
    finally:
        torch.set_num_threads(prev)
    # the work split depends on the shape only: every output is summed in the same order
    assert torch.equal(one, two) and torch.equal(one, three)


def test_fallback_agrees_with_kernel():
    wt, x = data((300, 70), 5), data((2, 300), 6)
    k = keep_count(300, 0.5)
    assert_close_to(cpu_kernels.gemv_topk(x, wt, k, use_kernel=False), x * topk_mask(x, k), wt)
    assert torch.allclose(cpu_kernels.gemv_topk(x, wt, k),
                          cpu_kernels.gemv_topk(x, wt, k, use_kernel=False), atol=1e-5)


@pytest.mark.parametrize("n", [1, 4, 7, 130, 2049 * 4 + 3])
def test_ternary_pack_roundtrip_and_gemv(n):
    d = 96
    codes = torch.randint(-1, 2, (n, d), generator=torch.Generator().manual_seed(n)).float()
    packed = cpu_kernels.pack_ternary(codes)
    assert packed.dtype == torch.uint8 and packed.shape == (d, (n + 3) // 4)
    assert torch.equal(cpu_kernels.unpack_ternary(packed, n), codes)
    x = data((2, d), n, "zeros")
    bias = data((n,), 1)
    y = cpu_kernels.gemv_ternary(x, packed, n, 0.37, bias)
    assert_close_to(y, x, codes.t() * 0.37, bias)
    ref = cpu_kernels.gemv_ternary(x, packed, n, 0.37, bias, use_kernel=False)
    assert_close_to(ref, x, codes.t() * 0.37, bias)


def test_shape_errors_are_clear():
    with pytest.raises(ValueError, match="input has 5 features"):
        cpu_kernels.gemv_topk(torch.randn(5), torch.randn(6, 3), 2)
    with pytest.raises(RuntimeError, match="need 1 <= k < d"):
        cpu_kernels._EXT.module.gemv_topk(torch.randn(6), torch.randn(6, 3), 0, None)


@pytest.mark.parametrize("wdtype", WDTYPES, ids=str)
@pytest.mark.parametrize("d,n", [(8, 64), (21, 192), (2048, 3072), (5632, 2048), (64, 16384 + 64)])
def test_tiled_weights_compute_the_same_products(d, n, wdtype, isa):
    """A tiled weight ([out/64, in, 64]: column tiles) holds the same values, and every product
    over it (dense, any kept rows, Top-K; both int8 paths) is the dense matmul within the
    kernels' bound. Each output is one chain over the kept rows in order, so a product over a
    single 64-column tile gives the row layout's result exactly where that runs on one thread in
    one row group (under 2^16 multiply-adds), and no product depends on the thread count."""
    wt, scale, deq = stored(data((d, n), 7), wdtype)
    tiled = cpu_kernels.tile_dense(wt)
    assert tiled.shape == (n // 64, d, 64) and tiled.is_contiguous()
    assert torch.equal(tiled[n // 64 - 1, d - 1, 63], wt[d - 1, n - 1])
    assert torch.equal(tiled[n // 64 - 1, 1, 5], wt[1, n - 64 + 5])
    assert torch.equal(cpu_kernels.untile(tiled), wt)
    assert torch.equal(cpu_kernels.dequantize(tiled, scale), deq)
    assert cpu_kernels.weight_shape(tiled) == (d, n)
    w64, s64 = wt[:, :64].contiguous(), None if scale is None else scale[:64].contiguous()
    one = cpu_kernels.tile_dense(w64)
    modes = ["off", "dense", "all"] if wdtype == torch.int8 else ["dense"]
    prev = cpu_kernels.set_int8_vnni("dense")
    threads = torch.get_num_threads()
    try:
        for mode in modes:
            cpu_kernels.set_int8_vnni(mode)
            for kind in ("randn", "zeros"):
                x = data((2, d), 8, kind)
                k = max(1, d // 3)
                y = cpu_kernels.gemv_nonzero(x, tiled, scale=scale)
                top = cpu_kernels.gemv_topk(x, tiled, k, scale=scale)
                assert_close_to(y, x, deq, int8=wdtype == torch.int8)
                assert_close_to(top, x * topk_mask(x, k), deq, int8=wdtype == torch.int8)
                if d * 64 < 1 << 16:
                    assert torch.equal(cpu_kernels.gemv_nonzero(x, one, scale=s64),
                                       cpu_kernels.gemv_nonzero(x, w64, scale=s64))
                torch.set_num_threads(1)
                assert torch.equal(cpu_kernels.gemv_nonzero(x, tiled, scale=scale), y)
                assert torch.equal(cpu_kernels.gemv_topk(x, tiled, k, scale=scale), top)
                torch.set_num_threads(threads)
    finally:
        torch.set_num_threads(threads)
        cpu_kernels.set_int8_vnni(prev)


def test_instruction_set_can_be_narrowed_and_restored():
    names = cpu_kernels.isas()
    assert names[0] == "baseline" and cpu_kernels.isa() == names[-1]
    prev = cpu_kernels.set_isa("baseline")
    try:
        assert prev == names[-1] and cpu_kernels.isa() == "baseline"
        assert cpu_kernels.int8_path() == "fp32"  # VNNI is an AVX-512 path
    finally:
        cpu_kernels.set_isa(prev)
    assert cpu_kernels.isa() == names[-1]
    with pytest.raises(ValueError, match="unknown instruction set 'sse9'"):
        cpu_kernels.set_isa("sse9")
    if "avx512" not in names:
        with pytest.raises(ValueError, match="this CPU runs .* at most, not avx512"):
            cpu_kernels.set_isa("avx512")


def test_tiling_errors_are_clear():
    with pytest.raises(ValueError, match=r"tile_dense: an input-major \[in, 64m\] weight"):
        cpu_kernels.tile_dense(torch.randn(12, 100))
    assert not cpu_kernels.can_tile(torch.randn(16, 100))
    with pytest.raises(ValueError, match="tiled"):  # a 3-D weight that is no tiling
        cpu_kernels.gemv_nonzero(torch.randn(16), torch.randn(2, 16, 32))
    with pytest.raises(RuntimeError, match="tiled"):
        cpu_kernels._EXT.module.gemv_nonzero(torch.randn(16), torch.randn(2, 16, 32), None)


@pytest.mark.parametrize("tile", [True, False])
def test_dense_decode_linear_holds_its_weight_tiled(tile):
    """A projection without a selection keeps a 16-bit weight tiled (a sparsified one, or an
    fp32 one, never): the kernel computes the dense matmul, prefill multiplies by the untiled
    weight."""
    torch.manual_seed(0)
    layer = ColumnParallelLinear(128, 192, bias=True, sparsifier=None)
    sparse = ColumnParallelLinear(128, 192, bias=True,
                                  sparsifier=build_sparsifier(QSparseConfig(ratio=0.5), "qkv", 0))
    dec = DecodeLinear(layer, tile=tile, weight_dtype=torch.bfloat16)
    rows = DecodeLinear(layer, tile=False, weight_dtype=torch.bfloat16)
    assert dec.wt.shape == ((3, 128, 64) if tile else (128, 192))
    assert DecodeLinear(sparse, weight_dtype=torch.bfloat16).wt.shape == (128, 192)
    assert DecodeLinear(layer).wt.shape == (128, 192)  # fp32
    assert dec.path() == "nonzero-gemv" and ("tiled" in repr(dec)) == tile
    w16 = layer.weight.to(torch.bfloat16)
    assert torch.equal(dec.weight_t(), w16.float().t())
    with torch.inference_mode():
        for x in (data((1, 1, 128), 1), data((1, 1, 128), 2, "zeros")):
            y = dec(x)
            assert torch.allclose(y, rows(x), rtol=1e-5, atol=1e-5)
            assert_close_to(y.view(-1), x.view(-1), w16.float().t(), layer.bias)
        prompt = data((1, 5, 128), 3)
        assert torch.allclose(dec(prompt), rows(prompt), rtol=1e-5, atol=1e-5)


CONFIGS = {
    "topk": QSparseConfig(ratio=0.6),
    "per-kind": QSparseConfig(ratio=0.4, qkv_ratio=0.7, down_ratio=0.2),
    "int8-topk": QSparseConfig(ratio=0.5, quantize_activations=True),
    "l2": QSparseConfig(ratio=0.5, rescale="l2"),
    "block": QSparseConfig(mode="block", block="2:4"),
    "relu": QSparseConfig(mode="relu"),
    "bitnet": QSparseConfig(mode="none", bitnet=True),
    "bitnet-topk": QSparseConfig(ratio=0.6, bitnet=True),
}


@pytest.mark.parametrize("name", sorted(CONFIGS))
@pytest.mark.parametrize("kind", ["qkv", "down"])
def test_decode_linear_equals_training_layer(name, kind):
    cfg = CONFIGS[name]
    torch.manual_seed(0)
    cls = ColumnParallelLinear if kind == "qkv" else RowParallelLinear
    layer = cls(128, 200, bias=True, sparsifier=build_sparsifier(cfg, kind, 0),
                bitnet=cfg.bitnet)
    with torch.no_grad():
        layer.bias.normal_()
    dec = DecodeLinear(layer)
    expect = {"topk": "fused-topk", "per-kind": "fused-topk", "bitnet": "sparsify+ternary-gemv",
              "bitnet-topk": "sparsify+ternary-gemv"}.get(name, "sparsify+nonzero-gemv")
    assert dec.path() == expect
    with torch.inference_mode():
        for x in (data((1, 1, 128), 1), data((1, 1, 128), 2, "rounded")):
            ref = layer(x)
            y = dec(x)  # one token: the kernel
            assert y.shape == ref.shape
            xs = layer.sparsifier(x)
            if cfg.bitnet:
                from megatron_qsparse.sparsity import int8_activation, ternary_weight
                xs, w = int8_activation(xs), ternary_weight(layer.weight)
            else:
                w = layer.weight
            assert_close_to(y.view(-1), xs.view(-1), w.t(), layer.bias)
            assert torch.allclose(y, ref, rtol=1e-5, atol=1e-5)
        prompt = data((1, 5, 128), 3)  # several tokens: the training forward (input-major matmul)
        assert torch.allclose(dec(prompt), layer(prompt), rtol=1e-5, atol=1e-5)


CUDA = torch.cuda.is_available()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("d,n", [(64, 33), (1000, 2050), (4096, 4096)] if CUDA else
                         [(64, 33), (300, 130)])
def test_triton_gemv_matches_dense_reference(d, n, dtype):
    """On CUDA the compiled kernel; without, Triton's interpreter (tests/conftest.py sets
    TRITON_INTERPRET=1) on CPU tensors, at smaller shapes."""
    from megatron_qsparse.inference import triton_kernels

    dev = "cuda" if CUDA else "cpu"
    wt = data((d, n), 1).to(dtype).to(dev)
    for s in (0.4, 0.6, 0.9):
        k = keep_count(d, s)
        x = data((d,), d + n).to(dtype).to(dev)
        y = triton_kernels.gemv_topk(x, wt, k)
        xs = x.float() * topk_mask(x, k)
        assert_close_to(y.cpu(), xs.cpu(), wt.float().cpu())


def test_semi_structured_guard_and_pattern():
    from megatron_qsparse.inference import semi_structured

    assert semi_structured.applies((2, 4)) and semi_structured.applies((1, 2))
    assert not semi_structured.applies((3, 4)) and not semi_structured.applies(None)
    if not torch.cuda.is_available():
        assert semi_structured.unavailable_reason() == "no CUDA device"
        with pytest.raises(RuntimeError, match="unavailable: no CUDA device"):
            semi_structured.block24_linear(torch.zeros(4, 64), torch.zeros(8, 64))


@pytest.mark.skipif(not torch.cuda.is_available()
                    or torch.cuda.get_device_capability()[0] < 8, reason="needs an Ampere+ GPU")
def test_block24_linear_matches_dense():
    from megatron_qsparse.inference import semi_structured

    sp = build_sparsifier(QSparseConfig(mode="block", block="2:4"), "qkv", 0)
    xs = sp(data((100, 192), 1)).half().cuda()
    w = data((96, 192), 2).half().cuda()
    y = semi_structured.block24_linear(xs, w)
    assert torch.allclose(y.float(), (xs.float() @ w.float().t()), rtol=1e-2, atol=1e-1)


@pytest.mark.skipif(cpu_kernels.int8_path() != "vnni", reason="needs AVX-512 VNNI")
@pytest.mark.parametrize("d,n", [(7, 64), (9, 200), (819, 2048), (300, 4096 + 64 + 9)])
def test_int8_vnni_path_is_within_its_bound_and_close_to_the_fp32_path(d, n):
    """The VNNI path of dense int8 products (int16 activations per pass of 8 rows) against the
    fp32-activation path: within 2^-16 of each pass's largest |x| per term; rows padded past the
    last full pass, the columns past the last 64, inf / NaN activations (fp32 path), and rows
    with zeros (scattered kept rows: the fp32 path)."""
    wt, scale, w32 = stored(data((d, n), d + 3 * n), torch.int8)
    x = data((4, d), d + n)
    x[1, : min(d, 8)] = 0.0  # zeros are not gathered: scattered rows
    x[2, 0] = 1e4  # one large activation beside small ones: the error bound is per pass
    x[3, d // 2] = float("inf")
    prev = cpu_kernels.set_int8_vnni(True)
    try:
        fast = cpu_kernels.gemv_nonzero(x, wt, scale=scale)
        cpu_kernels.set_int8_vnni("all")  # scattered rows (x[1]'s) through VNNI too
        every = cpu_kernels.gemv_nonzero(x, wt, scale=scale)
        cpu_kernels.set_int8_vnni(False)
        assert cpu_kernels.int8_path() == "fp32"
        slow = cpu_kernels.gemv_nonzero(x, wt, scale=scale)
    finally:
        cpu_kernels.set_int8_vnni(prev)
    assert cpu_kernels.int8_path() == "vnni" and prev == "dense"
    # per term error <= s/2 * |w| with s = (largest |x| of the pass) / 32767; a pass is 8
    # consecutive kept rows from where its row group starts, so within 7 rows either side
    x64 = x[:3].double()
    near = torch.nn.functional.max_pool1d(x64.abs().unsqueeze(1), 15, 1, 7).squeeze(1)
    bound = (near / 65534) @ w32.double().abs() + 2e-6 * (x64.abs() @ w32.double().abs()) + 1e-6
    ref = x64 @ w32.double()
    assert bool(((fast[:3].double() - ref).abs() <= bound).all())
    assert bool(((every[:3].double() - ref).abs() <= bound).all())
    with pytest.raises(ValueError, match="mode"):
        cpu_kernels.set_int8_vnni("sometimes")
    assert bool(((fast[:3] - slow[:3]).double().abs() <= 2 * bound).all())
    assert torch.equal(torch.isinf(fast[3]) | torch.isnan(fast[3]),
                       torch.isinf(slow[3]) | torch.isnan(slow[3]))
