"""Triton sparsifiers: the CUDA implementation of the sparsify ops (exact Top-K, block N:M, int8
quantized Top-K, and the candidate step of the tensor-parallel global Top-K).

Every function here is bit-identical to its PyTorch reference in ``sparsity/methods/`` and to the
C++ CPU kernel (``csrc/sparsify_cpu.cpp``), and none of them waits on the host: ``k`` is a device
tensor read inside the kernel, the nonzero count is accumulated on the device.

Contract (``x`` a float tensor ``[..., d]``: float32, bfloat16 or float16; rows are independent):

* :func:`topk_sparsify` ``(x, k, want_mask) -> (y, mask, nonzero)``: keep the ``k`` largest
  ``|x|`` of every row, ties to the LOWER feature index (exactly ``k`` per row);
* :func:`block_sparsify` ``(x, n, m, want_mask)``: in every group of ``m`` consecutive features
  keep the ``n`` largest ``|x|``, ties to the lower index;
* :func:`int8_topk_sparsify` ``(x, k, want_mask, eps)``: per-token absmax int8 fake quantization
  (``ste._fake_quant_int8``) fused with the Top-K of the quantized row;
* :func:`topk_candidates` ``(a, c, largest)``: the ``c`` largest (smallest) values of every row of a
  non-negative ``[rows, d_l]``, ``[rows, c]`` in no particular order (``methods/topk._extreme``).

``y`` has ``x``'s dtype and shape: kept entries are copied, dropped ones become a zero with the sign
of ``x`` (what ``x * 0`` gives for finite ``x``; a dropped ``±inf`` also becomes a signed zero, as
in the C++ kernel, where the product would be NaN). ``mask`` is the bool mask of kept entries, or None
when ``want_mask`` is false; ``nonzero`` a 0-dim int64 device tensor, the number of nonzero
entries of ``y``.

**Exact Top-K threshold (one program per row).** The row is loaded once into registers as the
integer bit patterns of ``|x|`` (the sign bit cleared: 31 bits for float32, 15 for bfloat16 and
float16). For non-negative IEEE floats the integer order of the bit patterns is the numeric order,
so the ``k``-th largest ``|x|`` is the largest integer ``t`` with ``#{a >= t} >= k``; it is built
bit by bit from the top (a binary radix search): ``t |= bit`` whenever ``#{a >= t | bit} >= k``,
one row-wide count per bit. Then ``G = #{a > t}`` entries are kept outright and the ``room = k - G``
ties ``a == t`` with the lowest indices join them (an inclusive ``tl.cumsum`` over the tie flags,
``<= room``). ``k == d`` ends at the row minimum and keeps everything; ``k`` is clamped to
``[0, d]`` in the kernel. The same pass writes ``y`` bitwise (``bits & (keep ? ~0 : sign)``), the
mask, and adds the row's nonzero count (kept and ``a != 0``) to one int64 counter with an atomic
add (integer atomics: deterministic). The row lives in registers (``BLOCK_D = next_pow2(d)``, at
most ``MAX_D``); the search costs ``NBITS`` reductions over it, the memory traffic one read of
``x`` and one write of ``y``.

**Block N:M (a tile of groups per program).** An entry is kept when fewer than ``n`` entries of
its group beat it (larger ``|x|``, or equal ``|x|`` at a lower index): an ``[groups, m, m]``
comparison of bit patterns, summed over the competitor axis. ``m`` is padded to a power of two
with patterns of ``-1`` that beat nothing.

**int8 Top-K.** The row is quantized in registers with the reference's fp32 operations in the
reference's order: ``γ = max|x| + eps``; ``s = (1 / γ) · 127`` (``127.0 / γ`` in PyTorch is
``γ.reciprocal() * 127``); ``round_half_even(x·s)`` (floor, then the exact fraction decides; no
libdevice, so the interpreter runs it too), ``clamp(-128, 127)``, ``· (γ / 127)``, rounded to
``x``'s dtype (to bfloat16 by hand, round to nearest even on the bits, because the interpreter's
cast truncates). ``round_half_even`` keeps the sign of a zero result, as ``torch.round`` does.
Divisions are IEEE round-to-nearest (``tl.math.div_rn``) and the kernel is built
with ``enable_fp_fusion=False`` so that no multiply-add is contracted into an FMA. ``γ / 127`` is
an exact division on CPU tensors and a multiply by ``fl32(1/127)`` on CUDA, as PyTorch computes a
division by a scalar on each device. The quantized row then goes through the Top-K above.

**Candidates.** The ``c`` largest (for ``largest=False`` the key is ``0x7fffffff - bits``, so the
largest keys are the smallest values) are selected exactly as in Top-K and compacted into
``out[row, :c]`` at their rank among the selected (a cumulative count), in feature order.

Without CUDA, set ``TRITON_INTERPRET=1`` before Triton is first imported in the process (it is
read when a kernel is decorated, and ``triton.language``'s own functions are decorated on its
import; ``torch.compile`` imports Triton, also on CPU) and the kernels run on CPU tensors through Triton's interpreter — slowly;
that is how ``tests/unit/test_triton_kernels.py`` runs them in CI. :func:`available` tells whether
they can run here.
"""

from __future__ import annotations

import os

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # the module stays importable; available() is False
    triton = None
    tl = None

MAX_D = 1 << 16  # widest row the register-resident Top-K takes
_INT = {torch.float32: torch.int32, torch.bfloat16: torch.int16, torch.float16: torch.int16}


def interpreting() -> bool:
    """Whether Triton's interpreter is on (``TRITON_INTERPRET``)."""
    if triton is None:
        return False
    knobs = getattr(triton, "knobs", None)
    if knobs is not None:
        return bool(knobs.runtime.interpret)
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")


def available() -> bool:
    """Triton is importable and there is somewhere to run it: CUDA, or the interpreter."""
    return triton is not None and (torch.cuda.is_available() or interpreting())


if triton is not None:

    @triton.jit
    def _select(key, k, NBITS: tl.constexpr):
        """Exactly ``k`` of the non-negative int32 ``key`` (padding: -1) kept: the ``k`` largest,
        ties to the lower index. Returns the bool keep vector."""
        t = tl.full((), 0, tl.int32)
        for i in range(NBITS):
            cand = t | (1 << (NBITS - 1 - i))
            cnt = tl.sum((key >= cand).to(tl.int32), axis=0)
            t = tl.where(cnt >= k, cand, t)
        gt = key > t
        room = k - tl.sum(gt.to(tl.int32), axis=0)
        eq = key == t
        return gt | (eq & (tl.cumsum(eq.to(tl.int32), axis=0) <= room))

    @triton.jit
    def _topk_kernel(x_ptr, y_ptr, mask_ptr, nz_ptr, k_ptr, d, eps,
                     ABS: tl.constexpr, SIGN: tl.constexpr, NBITS: tl.constexpr,
                     BLOCK_D: tl.constexpr, WANT_MASK: tl.constexpr, QUANT: tl.constexpr,
                     RECIP_DIV: tl.constexpr, OUT_BF16: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        offs = tl.arange(0, BLOCK_D)
        valid = offs < d
        base = row * d
        xv = tl.load(x_ptr + base + offs, mask=valid, other=0.0)
        if QUANT:  # ste._fake_quant_int8, the same fp32 operations in the same order
            xf = xv.to(tl.float32)
            gamma = tl.max(tl.abs(xf), axis=0) + eps
            s = tl.math.div_rn(1.0, gamma) * 127.0
            v = xf * s
            r = tl.floor(v)
            f = v - r  # exact for |v| < 2**23
            odd = (r - 2.0 * tl.floor(r * 0.5)) == 1.0
            r = tl.where((f > 0.5) | ((f == 0.5) & odd), r + 1.0, r)
            r = tl.where(r == 0.0, v * 0.0, r)  # rint keeps the sign of zero: round(-0.3) = -0.
            r = tl.minimum(tl.maximum(r, -128.0), 127.0)
            if RECIP_DIV:
                scale = gamma * 0.007874015718698502  # fl32(1/127), as CUDA divides by a scalar
            else:
                scale = tl.math.div_rn(gamma, 127.0)
            q = r * scale
            if OUT_BF16:  # round to nearest even by hand: the interpreter's cast truncates
                qb = q.to(tl.int32, bitcast=True)
                qa = qb & 0x7FFFFFFF
                rb = (qa + 0x7FFF + ((qa >> 16) & 1)) >> 16
                rb = tl.where(qa > 0x7F800000, 0x7FC0, rb)  # NaN stays a (quiet) NaN
                w = rb | ((qb >> 16) & -32768)
            else:
                w = q.to(xv.dtype).to(y_ptr.dtype.element_ty, bitcast=True).to(tl.int32)
        else:
            w = xv.to(y_ptr.dtype.element_ty, bitcast=True).to(tl.int32)  # sign-extended bits
        a = w & ABS
        k = tl.minimum(tl.maximum(tl.load(k_ptr).to(tl.int32), 0), d)
        keep = _select(tl.where(valid, a, -1), k, NBITS)
        out = tl.where(keep, w, w & SIGN)
        tl.store(y_ptr + base + offs, out.to(y_ptr.dtype.element_ty), mask=valid)
        if WANT_MASK:
            tl.store(mask_ptr + base + offs, keep.to(tl.uint8), mask=valid)
        nz = tl.sum((keep & (a != 0) & valid).to(tl.int32), axis=0)
        tl.atomic_add(nz_ptr, nz.to(tl.int64))

    @triton.jit
    def _block_kernel(x_ptr, y_ptr, mask_ptr, nz_ptr, groups,
                      ABS: tl.constexpr, SIGN: tl.constexpr, N: tl.constexpr, M: tl.constexpr,
                      MP: tl.constexpr, BLOCK_G: tl.constexpr, WANT_MASK: tl.constexpr):
        g = tl.program_id(0).to(tl.int64) * BLOCK_G + tl.arange(0, BLOCK_G)
        j = tl.arange(0, MP)
        valid = (g[:, None] < groups) & (j[None, :] < M)
        offs = g[:, None] * M + j[None, :]
        w = tl.load(x_ptr + offs, mask=valid, other=0).to(tl.int32)
        a = tl.where(valid, w & ABS, -1)
        ai = a[:, :, None]  # [groups, competitor i, entry j]
        aj = a[:, None, :]
        earlier = (j[:, None] < j[None, :])[None, :, :]
        beats = (ai > aj) | ((ai == aj) & earlier)
        keep = tl.sum(beats.to(tl.int32), axis=1) < N
        out = tl.where(keep, w, w & SIGN)
        tl.store(y_ptr + offs, out.to(y_ptr.dtype.element_ty), mask=valid)
        if WANT_MASK:
            tl.store(mask_ptr + offs, keep.to(tl.uint8), mask=valid)
        nz = tl.sum(tl.sum((keep & (a > 0) & valid).to(tl.int32), axis=1), axis=0)
        tl.atomic_add(nz_ptr, nz.to(tl.int64))

    @triton.jit
    def _candidates_kernel(a_ptr, out_ptr, d, c, ABS: tl.constexpr, NBITS: tl.constexpr,
                           BLOCK_D: tl.constexpr, LARGEST: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        offs = tl.arange(0, BLOCK_D)
        valid = offs < d
        av = tl.load(a_ptr + row * d + offs, mask=valid, other=0.0)
        bits = av.to(out_ptr.dtype.element_ty, bitcast=True).to(tl.int32) & ABS
        key = bits if LARGEST else ABS - bits
        keep = _select(tl.where(valid, key, -1), c, NBITS)
        pos = tl.cumsum(keep.to(tl.int32), axis=0) - 1
        tl.store(out_ptr + row * c + pos, bits.to(out_ptr.dtype.element_ty), mask=keep & valid)


def _require(x: torch.Tensor) -> None:
    if triton is None:
        raise RuntimeError("triton_kernels: Triton is not installed")
    if x.dtype not in _INT:
        raise TypeError(f"triton_kernels: unsupported dtype {x.dtype} (float32, bfloat16, "
                        "float16)")


def _layout(dtype: torch.dtype):
    """``(ABS, SIGN, NBITS)``: the |x| and sign masks of the sign-extended int32 bit pattern."""
    if dtype == torch.float32:
        return 0x7FFFFFFF, -(1 << 31), 31
    return 0x7FFF, -(1 << 15), 15


def _row_block(d: int) -> tuple[int, int]:
    if d > MAX_D:
        raise ValueError(f"triton_kernels: rows of {d} features exceed MAX_D={MAX_D}")
    block = triton.next_power_of_2(d)
    return block, max(4, min(16, block // 512))


def _outputs(x: torch.Tensor, want_mask: bool):
    y = torch.empty_like(x)
    mask = torch.empty(x.shape, dtype=torch.bool, device=x.device) if want_mask else None
    nonzero = torch.zeros((), dtype=torch.int64, device=x.device)
    return y, mask, nonzero


def _topk(x: torch.Tensor, k: torch.Tensor, want_mask: bool, quant: bool, eps: float):
    _require(x)
    x = x.contiguous()
    d = x.shape[-1]
    y, mask, nonzero = _outputs(x, want_mask)
    rows = x.numel() // d if d else 0
    if rows == 0:
        return y, mask, nonzero
    if not torch.is_tensor(k):
        k = torch.tensor(k, dtype=torch.int64)
    k = k.to(device=x.device, dtype=torch.int64)  # a no-op when it is already there
    abs_mask, sign, nbits = _layout(x.dtype)
    block, warps = _row_block(d)
    yi = y.view(_INT[x.dtype])
    _topk_kernel[(rows,)](x, yi, mask.view(torch.uint8) if want_mask else yi, nonzero, k, d,
                          float(eps), ABS=abs_mask, SIGN=sign, NBITS=nbits, BLOCK_D=block,
                          WANT_MASK=want_mask, QUANT=quant, RECIP_DIV=x.is_cuda,
                          OUT_BF16=x.dtype == torch.bfloat16,
                          num_warps=warps, enable_fp_fusion=False)
    return y, mask, nonzero


def topk_sparsify(x: torch.Tensor, k: torch.Tensor, want_mask: bool):
    """Exact per-row Top-K of ``|x|`` (ties to the lower index), ``(y, mask | None, nonzero)``.

    ``k``: a 0-dim int64 tensor on ``x.device`` with ``1 <= k <= d`` (read by the kernel; a
    Python int is accepted too). Bit-identical to ``x * topk_mask(x, k)``.
    """
    return _topk(x, k, want_mask, False, 0.0)


def int8_topk_sparsify(x: torch.Tensor, k: torch.Tensor, want_mask: bool, eps: float = 1e-5):
    """Per-token absmax int8 fake quantization, then Top-K, in one pass: bit-identical to
    ``topk_sparsify(quantize_int8(x, eps), k, want_mask)``."""
    return _topk(x, k, want_mask, True, eps)


def block_sparsify(x: torch.Tensor, n: int, m: int, want_mask: bool):
    """Block N:M of ``|x|`` (ties to the lower index), ``(y, mask | None, nonzero)``.
    Bit-identical to ``x * block_mask(x, n, m)``; ``d % m == 0``."""
    _require(x)
    x = x.contiguous()
    d = x.shape[-1]
    if m < 1 or d % m or not 0 <= n <= m:
        raise ValueError(f"block_sparsify: need 0 <= n <= m and d % m == 0, got n={n}, m={m}, "
                         f"d={d}")
    y, mask, nonzero = _outputs(x, want_mask)
    groups = x.numel() // m
    if groups == 0:
        return y, mask, nonzero
    abs_mask, sign, _ = _layout(x.dtype)
    mp = triton.next_power_of_2(m)
    block_g = max(1, min(triton.next_power_of_2(groups), 4096 // (mp * mp)))
    xi, yi = x.view(_INT[x.dtype]), y.view(_INT[x.dtype])
    _block_kernel[(triton.cdiv(groups, block_g),)](
        xi, yi, mask.view(torch.uint8) if want_mask else yi, nonzero, groups, ABS=abs_mask,
        SIGN=sign, N=n, M=m, MP=mp, BLOCK_G=block_g, WANT_MASK=want_mask)
    return y, mask, nonzero


def topk_candidates(a: torch.Tensor, c: int, largest: bool) -> torch.Tensor:
    """The ``c`` largest (``largest``) or smallest values of every row of the non-negative 2-D
    ``a``, ``[rows, c]``, same dtype; as a multiset (the order within a row is unspecified)."""
    _require(a)
    if a.dim() != 2:
        raise ValueError(f"topk_candidates: expected a 2-D tensor, got shape {tuple(a.shape)}")
    rows, d = a.shape
    if not 1 <= c <= d:
        raise ValueError(f"topk_candidates: need 1 <= c <= {d}, got {c}")
    if c == d:
        return a
    a = a.contiguous()
    out = torch.empty((rows, c), dtype=a.dtype, device=a.device)
    if rows == 0:
        return out
    abs_mask, _, nbits = _layout(a.dtype)
    block, warps = _row_block(d)
    _candidates_kernel[(rows,)](a, out.view(_INT[a.dtype]), d, c, ABS=abs_mask, NBITS=nbits,
                                BLOCK_D=block, LARGEST=largest, num_warps=warps)
    return out
