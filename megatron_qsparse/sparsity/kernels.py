"""Compiled CPU kernels for the sparsifiers, built on first use, with a pure-PyTorch fallback.

The C++ source is ``csrc/sparsify_cpu.cpp`` (the algorithm is described at its top). It is
compiled with :func:`torch.utils.cpp_extension.load` (``-O3 -fopenmp``; no ``-march``, so a cached
binary runs on any CPU of its architecture) the first time a CPU tensor is sparsified (~30 s), and
cached: later processes load it in milliseconds. Concurrent first uses (e.g. several ranks) wait
for one build (an OS file lock, so a build killed half-way never blocks the next one). To build
ahead of time, e.g. before launching many ranks with a timeout:
``python -c "from megatron_qsparse.sparsity import kernels; print(kernels.available())"``.

The loader is generic: :func:`compile_extension` builds any C++ source with the same flags, cache
and lock, and :class:`LazyExtension` wraps it as a build-on-first-use extension with one warning
and a fallback (the sparse decode GEMV of ``inference/cpu_kernels.py`` uses it; the Top-K threshold
search is shared with it through ``csrc/topk_select.h``).

Environment (``use_kernels(False)`` also switches them off inside a ``with`` block):

* ``MEGATRON_QSPARSE_KERNELS=0`` never build or use the kernels (the PyTorch path runs).
* ``MEGATRON_QSPARSE_EXT_DIR`` build cache directory; default: torch's extension cache
  (``$TORCH_EXTENSIONS_DIR`` or ``~/.cache/torch_extensions``). The build lives in a sub-folder
  named after a digest of the source, the torch version and the Python version.

If the kernels are disabled or the build fails, one warning is logged and every caller falls back to
:func:`~megatron_qsparse.sparsity.masks.topk_mask` / ``block_mask`` (same results, slower).

Both kernels return ``(y, mask, nonzero)``: ``y`` the sparsified copy of ``x`` (dropped entries are
``x * 0``, i.e. zeros carrying the sign of ``x``), ``mask`` the bool mask of kept entries or None
when not asked for, ``nonzero`` the number of nonzero entries of ``y`` as a Python int. The one
difference from the reference ``x * mask``: a dropped ``±inf`` becomes a signed zero, where the
product gives NaN.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import sys
import threading
from pathlib import Path
from types import ModuleType
from typing import Sequence

import torch

from megatron_qsparse.atomic import write_bytes

logger = logging.getLogger(__name__)

ENV_ENABLE = "MEGATRON_QSPARSE_KERNELS"
ENV_DIR = "MEGATRON_QSPARSE_EXT_DIR"
SOURCE = Path(__file__).with_name("csrc") / "sparsify_cpu.cpp"
DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
MAX_BLOCK_M = 32  # the block kernel compares every pair of a group: O(M) per entry
_CFLAGS = ["-O3", "-fopenmp"]

_lock = threading.Lock()
_module: ModuleType | None = None
_tried = False
_error: str | None = None
_enabled = True  # switched by use_kernels() (benchmarks, debugging)


def _build_dir(name: str) -> Path:
    base = os.environ.get(ENV_DIR) or os.environ.get("TORCH_EXTENSIONS_DIR") or os.path.join(
        os.path.expanduser("~"), ".cache", "torch_extensions")
    return Path(base) / name


def _load() -> ModuleType | None:
    global _module, _tried, _error
    with _lock:
        if _tried:
            return _module
        _tried = True
        if kernels_disabled():
            _error = f"disabled by {ENV_ENABLE}=0"
        else:
            try:
                _module = _compile()
            except Exception as e:  # compiler missing, headers missing, read-only cache, ...
                lines = str(e).strip().splitlines() or [""]
                _error = f"{type(e).__name__}: {lines[-1]}"
        if _module is None:
            logger.warning("Q-Sparse CPU kernels unavailable (%s); using the pure-PyTorch "
                           "sparsifier (same results, slower)", _error)
        return _module


def _compile() -> ModuleType:
    return compile_extension("megatron_qsparse_cpu", [SOURCE])


def compile_extension(prefix: str, sources: Sequence[Path],
                      include_dirs: Sequence[Path] = ()) -> ModuleType:
    """Build (or load the cached build of) a C++ extension from ``sources`` (``-O3 -fopenmp``).

    The build lives in ``<cache>/<prefix>_<digest>``, the digest covering the sources, every
    ``*.h`` beside them or in ``include_dirs``, the flags, the torch and the Python version; an
    OS file lock makes concurrent first uses wait for one build. Raises if the build fails.
    """
    from torch.utils.cpp_extension import load

    sources = [Path(s) for s in sources]
    dirs = sorted({s.parent for s in sources} | {Path(d) for d in include_dirs})
    headers = sorted(h for d in dirs for h in d.glob("*.h"))
    digest = hashlib.sha1()
    for f in [*sources, *headers]:
        digest.update(f.name.encode() + f.read_bytes())
    digest.update(" ".join(_CFLAGS).encode() + torch.__version__.encode() + sys.version.encode())
    name = f"{prefix}_{digest.hexdigest()[:12]}"
    build = _build_dir(name)
    build.mkdir(parents=True, exist_ok=True)
    with _build_lock(build):
        if not (build / f"{name}.so").exists():
            logger.info("building %s in %s (once per machine, ~30-60 s)", prefix, build)
        # Compile copies kept in the build folder: ninja rebuilds when a source *path* changes,
        # so two checkouts of the same code (same digest) would otherwise rebuild in turn.
        src = build / "src"
        src.mkdir(exist_ok=True)
        for f in [*sources, *headers]:
            dst = src / f.name
            if not dst.exists() or dst.read_bytes() != f.read_bytes():
                write_bytes(dst, f.read_bytes())
        return load(name=name, sources=[str(src / s.name) for s in sources],
                    extra_cflags=_CFLAGS, extra_ldflags=["-fopenmp"],
                    extra_include_paths=[str(src)], build_directory=str(build),
                    with_cuda=False, verbose=False)


def kernels_disabled() -> bool:
    """Whether ``MEGATRON_QSPARSE_KERNELS`` switches every compiled kernel off."""
    return os.environ.get(ENV_ENABLE, "1").strip().lower() in ("0", "false", "no", "off")


class LazyExtension:
    """A compiled extension built on first use (:func:`compile_extension`), or the reason not.

    ``get()`` returns the module or None (one warning is logged, naming ``what`` and the
    fallback); it honours ``MEGATRON_QSPARSE_KERNELS=0``. Thread-safe; tried once per process.
    """

    def __init__(self, prefix: str, sources: Sequence[Path], include_dirs: Sequence[Path] = (),
                 what: str = "", fallback: str = "the pure-PyTorch path"):
        self.prefix, self.sources, self.include_dirs = prefix, list(sources), list(include_dirs)
        self.what, self.fallback = what or prefix, fallback
        self.module: ModuleType | None = None
        self.tried = False
        self.error: str | None = None
        self._lock = threading.Lock()

    def get(self) -> ModuleType | None:
        if self.tried:
            return self.module
        with self._lock:
            if self.tried:
                return self.module
            if kernels_disabled():
                self.error = f"disabled by {ENV_ENABLE}=0"
            else:
                try:
                    self.module = compile_extension(self.prefix, self.sources, self.include_dirs)
                except Exception as e:  # compiler missing, headers missing, read-only cache, ...
                    lines = str(e).strip().splitlines() or [""]
                    self.error = f"{type(e).__name__}: {lines[-1]}"
            if self.module is None:
                logger.warning("%s unavailable (%s); using %s", self.what, self.error,
                               self.fallback)
            self.tried = True
            return self.module


@contextlib.contextmanager
def _build_lock(build: Path):
    """Exclusive lock on the build directory that the OS releases if its holder dies.

    torch's own lock (a ``lock`` file polled forever) stays behind when a process is killed
    mid-build, and every later process would then wait for ever; holding this lock we know no
    live process is building here, so such a file is stale and removed.
    """
    try:
        import fcntl
    except ImportError:  # not POSIX: rely on torch's lock alone
        yield
        return
    with open(build / "megatron_qsparse.flock", "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            (build / "lock").unlink(missing_ok=True)
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def available() -> bool:
    """Whether the compiled kernels can be used (builds them on the first call)."""
    return _load() is not None


def unavailable_reason() -> str | None:
    """Why the kernels are not available (None if they are or were never requested)."""
    _load()
    return _error


def supports(x: torch.Tensor) -> bool:
    """Whether ``x`` can go through the kernels: a CPU float tensor, and the kernels built."""
    return (_enabled and x.device.type == "cpu" and x.dtype in DTYPES and x.dim() >= 1
            and (_module is not None or (not _tried and _load() is not None)))


def kernels_enabled() -> bool:
    """Whether compiled kernels may be used now (False inside ``use_kernels(False)``)."""
    return _enabled


@contextlib.contextmanager
def use_kernels(enabled: bool):
    """Context manager: inside, the sparsifiers use the kernels (if available) or never do.

    For benchmarks and debugging (``with use_kernels(False): ...`` runs the PyTorch reference);
    process-wide, not thread-local.
    """
    global _enabled
    prev, _enabled = _enabled, bool(enabled)
    try:
        yield
    finally:
        _enabled = prev


def _require() -> ModuleType:
    module = _module or _load()
    if module is None:
        raise RuntimeError(f"Q-Sparse CPU kernels unavailable: {_error}")
    return module


def topk_sparsify(x: torch.Tensor, k: int, want_mask: bool = False):
    """Exact per-row Top-K of ``|x|`` (last dim, ties to the lower index), ``1 <= k < d``.

    ``x``: CPU, one of :data:`DTYPES` (made contiguous if needed; no autograd). Returns
    ``(y, mask | None, nonzero)``, bit-identical to ``x * topk_mask(x, k)`` (see above for ±inf).
    """
    return _require().topk_sparsify(x.detach().contiguous(), k, want_mask)


def block_sparsify(x: torch.Tensor, n: int, m: int, want_mask: bool = False):
    """Block N:M: keep the ``n`` largest ``|x|`` of every ``m`` consecutive (ties to the lower
    index); the last dim must be a multiple of ``m``.

    Returns ``(y, mask | None, nonzero)``, bit-identical to ``x * block_mask(x, n, m)``.
    """
    return _require().block_sparsify(x.detach().contiguous(), n, m, want_mask)
