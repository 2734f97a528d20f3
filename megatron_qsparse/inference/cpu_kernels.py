"""Sparse GEMV kernels for the decode step on CPU, with a pure-PyTorch reference.

With top-K inputs a projection ``y = W x_s + b`` needs only the weight rows of the kept inputs.
Decoding one token is bound by weight traffic, so reading ``K`` of ``d`` rows gives up to
``d/K = 1/(1-S)`` speed-up. The weight is held **input-major** (``wt = W.T``, ``[in, out]``
contiguous) so each kept input's row is one contiguous read; see ``csrc/sparse_gemv_cpu.cpp``.

* :func:`gemv_topk` — fused: the exact Top-K of ``|x|`` (the training sparsifier's selection,
  ties to the lower index, shared C++ code) and the product, in one call;
* :func:`gemv_nonzero` — any sparsifier: ``x`` is already sparse (block N:M, ReLU, int8-quantized
  or rescaled Top-K from :class:`~megatron_qsparse.sparsity.Sparsifier`); the nonzero rows are read;
* :func:`gemv_ternary` — BitNet b1.58: weights packed 2 bits each (:func:`pack_ternary`), the
  product scaled by ``alpha``; 1/16 of the fp32 weight bytes.

Every function takes ``x [..., d]`` (rows are independent; each row is one token) of any float
dtype and returns fp32 ``[..., out]``. The compiled kernel (built on first use and cached by
:mod:`megatron_qsparse.sparsity.kernels`, ``MEGATRON_QSPARSE_KERNELS=0`` disables it) is used when
available; otherwise, or with ``use_kernel=False`` (or inside ``sparsity.kernels.use_kernels(False)``),
the reference below runs (a dense matmul on the
sparsified input: same result up to fp32 summation order). Weights may be fp32 or bf16 (the kernel
converts bf16 to fp32 as it reads; half the traffic).
"""

from __future__ import annotations

from pathlib import Path

import torch

from megatron_qsparse.sparsity import kernels as _sparsify_kernels
from megatron_qsparse.sparsity.masks import topk_mask

_CSRC = Path(__file__).with_name("csrc")
_EXT = _sparsify_kernels.LazyExtension(
    "megatron_qsparse_decode", [_CSRC / "sparse_gemv_cpu.cpp"],
    include_dirs=[_sparsify_kernels.SOURCE.parent], what="Q-Sparse sparse decode kernels",
    fallback="dense matmuls on the sparsified input (same results, slower)")
WEIGHT_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.int8)


def available() -> bool:
    """Whether the compiled decode kernels can be used (builds them on the first call)."""
    return _EXT.get() is not None


def unavailable_reason() -> str | None:
    _EXT.get()
    return _EXT.error


def extension():
    """The compiled module (None when unavailable); the decode step's class lives there."""
    return _EXT.get()


def isa() -> str:
    """Instruction set of the kernel's inner loops (``avx512``, ``avx2``, ``baseline``)."""
    module = _EXT.get()
    return module.isa() if module is not None else "unavailable"


ISAS = ("baseline", "avx2", "avx512")  # narrowest first


def isas() -> list[str]:
    """The instruction sets the kernels can run with on this CPU, narrowest first (``[]`` without
    the kernels): :func:`set_isa` takes any of them."""
    module = _EXT.get()
    if module is None:
        return []
    return list(ISAS[:ISAS.index(module.cpu_isa()) + 1])


def set_isa(name: str) -> str:
    """Run the kernels' inner loops with instruction set ``name`` (one of :func:`isas`: a
    narrower one than the CPU's runs the paths of a CPU that has only that one, for tests and
    benchmarks). Call it between products, not while another thread runs one. Returns the
    previous one."""
    if name not in ISAS:
        raise ValueError(f"set_isa: unknown instruction set {name!r}, expected one of {ISAS}")
    module = _EXT.get()
    if module is None:
        raise RuntimeError(f"set_isa: the decode kernels are unavailable ({_EXT.error})")
    if name not in isas():
        raise ValueError(f"set_isa: this CPU runs {module.cpu_isa()} at most, not {name}")
    return module.set_isa(name)


def int8_path() -> str:
    """How int8 weights are multiplied in dense products (consecutive rows): ``vnni`` (AVX-512
    VNNI: activations quantized to int16 per pass of eight rows, error <= 2^-16 of the pass's
    largest ``|x|``), ``fp32`` (each weight widened to fp32, exact activations; always the path
    of scattered kept rows) or ``unavailable``."""
    module = _EXT.get()
    return module.int8_path() if module is not None else "unavailable"


_VNNI_MODES = ("off", "dense", "all")


def set_int8_vnni(mode: bool | str) -> str:
    """Which int8 products take the VNNI path where the CPU has it: ``"dense"`` (consecutive
    rows; the default, also ``True``), ``"off"`` (``False``: the fp32 path everywhere) or
    ``"all"`` (scattered kept rows too; measured slower there, for benchmarks). Returns the
    previous mode; a no-op without the kernels."""
    if isinstance(mode, bool):
        mode = "dense" if mode else "off"
    if mode not in _VNNI_MODES:
        raise ValueError(f"set_int8_vnni: mode {mode!r}, expected one of {_VNNI_MODES}")
    module = _EXT.get()
    if module is None:
        return "off"
    return _VNNI_MODES[module.set_int8_vnni(_VNNI_MODES.index(mode))]


def set_decode_profile(on: bool) -> None:
    """Reset the compiled decode step's per-phase timers and switch them on (or off); a no-op
    without the kernels. Off (the default), a phase costs one flag test."""
    module = _EXT.get()
    if module is not None:
        module.set_profile(bool(on))


def decode_profile() -> dict[str, float]:
    """Milliseconds per decode step of each phase of the compiled step, over the steps since
    :func:`set_decode_profile` ``(True)``: ``select`` (each projection's sparsifier and kept-set
    gather), ``products`` (the projections' sparse products, their ``reduce`` of row-group
    partials included; also by projection: ``qkv``, ``o``, ``gate_up``, ``down`` (MoE experts'
    included) and ``router``), ``reduce`` (the calling thread's share of adding the partials,
    which the thread that finishes a row group adds while the others stream; also the LM
    head's), ``head`` (the LM head's product), ``attention``, ``activation`` (the FFN's GLU),
    ``other`` (norms, RoPE, KV append, residuals, MoE routing: the step minus the rest),
    ``step``, and ``wait`` (the calling
    thread waiting for the helpers' last work units, inside the phases above: the load
    imbalance); ``{}`` when no step was profiled."""
    module = _EXT.get()
    if module is None:
        return {}
    raw = module.profile()
    steps = raw.pop("steps")
    if steps == 0:
        return {}
    ms = {k: v / steps / 1e6 for k, v in raw.items()}
    ms["products"] = sum(ms[k] for k in PROJECTIONS)
    ms["other"] = ms["step"] - sum(ms[k] for k in ("select", "products", "head", "attention",
                                                   "activation"))
    return ms


PROJECTIONS = ("qkv", "o", "gate_up", "down", "router")  # decode_profile's products, by kind


def on_huge_pages(t: torch.Tensor) -> torch.Tensor:
    """A decode weight ``t`` (contiguous, CPU) copied into memory advised for transparent huge
    pages, where the kernels are enabled and the OS has them; else ``t`` itself. Decoding streams
    every weight once per token: 2 MB pages save a TLB miss per 4 KB and keep the prefetchers
    running across page boundaries (a few % tokens/s)."""
    if (t.device.type != "cpu" or not t.is_contiguous() or t.numel() * t.element_size() < 1 << 21
            or not _sparsify_kernels.kernels_enabled() or _EXT.get() is None):
        return t
    return _EXT.module.huge_page_copy(t)


def _use(x: torch.Tensor, w: torch.Tensor, use_kernel: bool) -> bool:
    return (use_kernel and x.device.type == "cpu" and w.device.type == "cpu"
            and x.dtype in (torch.float32, torch.bfloat16, torch.float16)
            and _sparsify_kernels.kernels_enabled() and _EXT.get() is not None)


TILE_COLS = 64


def can_tile(wt: torch.Tensor) -> bool:
    """Whether an input-major ``[in, out]`` weight has a tiled form (:func:`tile_dense`)."""
    return wt.dim() == 2 and wt.shape[1] % TILE_COLS == 0


def tile_dense(wt: torch.Tensor) -> torch.Tensor:
    """The column-tiled form ``[out/64, in, 64]`` of an input-major ``[in, out]`` weight
    (:func:`can_tile`): ``out/64`` input-major ``[in, 64]`` matrices one after the other. The
    kernels take either form (any row of a tiled weight can be read). A product over it works
    tile by tile in registers, so each work unit reads one contiguous region (a dense product:
    one sequential stream, where a dense pass over the row layout reads eight streams a row
    apart) and no partial sums are added; dense products of 16-bit and int8 weights read it
    faster than rows or as fast (by CPU), fp32 ones slower (``bench/bench_dense_layout.py``).
    :func:`untile` gives the ``[in, out]`` weight back."""
    if not can_tile(wt):
        raise ValueError(f"tile_dense: an input-major [in, {TILE_COLS}m] weight is needed, got "
                         f"{tuple(wt.shape)}")
    d, n = wt.shape
    return wt.reshape(d, n // TILE_COLS, TILE_COLS).permute(1, 0, 2).contiguous()


def tile_if_dense(wt: torch.Tensor) -> torch.Tensor:
    """The tiled form of a 16-bit or int8 weight that every decode product reads whole (the LM
    head, a projection without a selection) where the kernels run and its shape allows; else
    ``wt`` (fp32 weights too: their dense products measured 7-12% slower tiled)."""
    if (wt.device.type == "cpu" and wt.element_size() < 4 and can_tile(wt)
            and _sparsify_kernels.kernels_enabled() and available()):
        return tile_dense(wt)
    return wt


def untile(wt: torch.Tensor) -> torch.Tensor:
    """The input-major ``[in, out]`` weight of a tiled one (:func:`tile_dense`); ``wt`` itself
    when it is not tiled."""
    if wt.dim() != 3:
        return wt
    return wt.permute(1, 0, 2).reshape(wt.shape[1], wt.shape[0] * TILE_COLS)


def weight_shape(wt: torch.Tensor) -> tuple[int, int]:
    """``(in, out)`` of a decode weight in either layout."""
    if wt.dim() == 3:
        return wt.shape[1], wt.shape[0] * TILE_COLS
    return tuple(wt.shape)


def _check(x: torch.Tensor, wt: torch.Tensor) -> None:
    tiled = wt.dim() == 3 and wt.shape[2] == TILE_COLS
    if not (wt.dim() == 2 or tiled) or x.shape[-1] != weight_shape(wt)[0]:
        raise ValueError(f"sparse gemv: input has {x.shape[-1]} features, the input-major weight "
                         f"is {tuple(wt.shape)} ([in, out] or tiled [out/64, in, 64] expected)")


def dequantize(wt: torch.Tensor, scale: torch.Tensor | None = None) -> torch.Tensor:
    """The fp32 ``[in, out]`` weight a stored decode weight stands for: ``wt`` itself (fp32 /
    bf16 / fp16, untiled), or ``int8 codes * scale`` (one scale per output column of the
    input-major ``[in, out]``)."""
    wt = untile(wt)
    if wt.dtype == torch.int8:
        if scale is None:
            raise ValueError("int8 decode weights need their per-output scales")
        return wt.float() * scale.float()
    return wt.float()


def quantize_int8(wt: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-output-channel int8 of an input-major weight ``[in, out]``:
    ``scale_j = max_i |W_ij| / 127``, ``q = round(W / scale)`` in [-127, 127]. Returns
    ``(q int8 [in, out], scale fp32 [out])``; an all-zero column gets scale 1 (codes 0)."""
    w = wt.float()
    amax = w.abs().amax(dim=0)
    scale = torch.where(amax > 0, amax / 127.0, torch.ones_like(amax))
    q = (w / scale).round().clamp(-127, 127).to(torch.int8)
    return q.contiguous(), scale.contiguous()


def _reference(xs: torch.Tensor, wt: torch.Tensor, bias: torch.Tensor | None,
               scale: torch.Tensor | None = None) -> torch.Tensor:
    y = xs.float() @ dequantize(wt, scale)
    return y if bias is None else y + bias.float()


def gemv_topk(x: torch.Tensor, wt: torch.Tensor, k: int, bias: torch.Tensor | None = None, *,
              scale: torch.Tensor | None = None, use_kernel: bool = True) -> torch.Tensor:
    """``topk(x, k) @ wt (+ bias)`` in fp32: the Top-K of ``|x|`` per row, ``1 <= k <= d``.
    ``wt`` fp32 / bf16 / fp16, or int8 with ``scale`` (:func:`quantize_int8`)."""
    _check(x, wt)
    if k >= x.shape[-1]:
        return gemv_nonzero(x, wt, bias, scale=scale, use_kernel=use_kernel)
    if _use(x, wt, use_kernel) and wt.dtype in WEIGHT_DTYPES:
        y = _EXT.module.gemv_topk(x, wt.contiguous(), k, bias, scale)
        return y.view(*x.shape[:-1], weight_shape(wt)[1])
    return _reference(x * topk_mask(x, k), wt, bias, scale)


def gemv_nonzero(x: torch.Tensor, wt: torch.Tensor, bias: torch.Tensor | None = None, *,
                 scale: torch.Tensor | None = None, use_kernel: bool = True) -> torch.Tensor:
    """``x @ wt (+ bias)`` in fp32 reading only the rows of ``wt`` where ``x`` is nonzero
    (weights as in :func:`gemv_topk`)."""
    _check(x, wt)
    if _use(x, wt, use_kernel) and wt.dtype in WEIGHT_DTYPES:
        y = _EXT.module.gemv_nonzero(x, wt.contiguous(), bias, scale)
        return y.view(*x.shape[:-1], weight_shape(wt)[1])
    return _reference(x, wt, bias, scale)


def stream_read(a: torch.Tensor) -> float:
    """Sum of a contiguous fp32 CPU buffer on the kernels' threads and work split: a STREAM-like
    read to compare the products' bandwidth with (``bench/bench_decode.py``)."""
    module = _EXT.get()
    if module is None:
        return float(a.sum())
    return module.stream_read(a)


def kept_rows_read(buf: torch.Tensor, idx: torch.Tensor) -> int:
    """Read rows ``idx`` of a contiguous CPU uint8 ``[rows, L]`` buffer (``L`` a multiple of 64)
    the way the products read kept weight rows (eight rows per pass, each row one sequential
    run, the kernels' threads and row groups) with one add per cache line, and return the sum of
    their 64-bit words (int64, wrapping). The bandwidth it reaches is the bound of the kept-row
    pattern itself (``bench/bench_read_pattern.py``)."""
    if buf.dtype != torch.uint8 or buf.dim() != 2 or buf.shape[1] % 64 or not buf.is_contiguous():
        raise ValueError(f"kept_rows_read: expected a contiguous uint8 [rows, L] buffer with L a "
                         f"multiple of 64, got {buf.dtype} {list(buf.shape)}")
    module = _EXT.get()
    if module is None:
        return int(buf[idx].view(torch.int64).sum())
    return module.kept_rows_read(buf, idx.to(torch.int64).contiguous())  # buf: no hidden copy


# ---------------------------------------------------------------------------------------------
# BitNet b1.58: 2-bit packed ternary weights


def pack_ternary(t: torch.Tensor) -> torch.Tensor:
    """Pack ternary codes ``t [out, in]`` (values in {-1, 0, 1}) input-major, 4 per byte.

    Returns ``uint8 [in, P]``, ``P = ceil(out / 4)``: byte ``b`` of input row ``i`` holds
    ``t[b + q·P, i] + 1`` in bits ``2q..2q+1`` for ``q = 0..3`` (outputs past ``out`` hold 1,
    i.e. zero). This plane layout lets the kernel decode a run of bytes into four contiguous runs
    of outputs.
    """
    out, d = t.shape
    p = (out + 3) // 4
    codes = torch.ones(4 * p, d, dtype=torch.uint8)
    codes[:out] = (t.round().clamp(-1, 1).to(torch.int16) + 1).to(torch.uint8)
    planes = codes.view(4, p, d)
    packed = planes[0] | (planes[1] << 2) | (planes[2] << 4) | (planes[3] << 6)
    return packed.t().contiguous()


def unpack_ternary(packed: torch.Tensor, out: int) -> torch.Tensor:
    """Inverse of :func:`pack_ternary`: ``float32 [out, in]`` codes in {-1, 0, 1}."""
    d, p = packed.shape
    planes = torch.stack([(packed >> (2 * q)) & 3 for q in range(4)])  # [4, in, P]
    codes = planes.permute(0, 2, 1).reshape(4 * p, d)[:out]
    return codes.float() - 1.0


def gemv_ternary(x: torch.Tensor, packed: torch.Tensor, out: int, alpha: float,
                 bias: torch.Tensor | None = None, *, use_kernel: bool = True) -> torch.Tensor:
    """``alpha · (x @ T.T) (+ bias)`` in fp32 for 2-bit packed ternary ``T`` (:func:`pack_ternary`),
    reading only the packed rows where ``x`` is nonzero."""
    if packed.dim() != 2 or x.shape[-1] != packed.shape[0]:
        raise ValueError(f"gemv_ternary: input has {x.shape[-1]} features, the packed weight "
                         f"{tuple(packed.shape)}")
    if _use(x, packed, use_kernel):
        y = _EXT.module.gemv_ternary(x, packed.contiguous(), out, float(alpha), bias)
        return y.view(*x.shape[:-1], out)
    y = (x.float() @ unpack_ternary(packed, out).t()) * float(alpha)
    return y if bias is None else y + bias.float()
