"""Atomic file writes: a temporary file in the target's folder, fsync, then a rename.

A crash at any point leaves either the old file or the new one, never a half-written file.
"""

from __future__ import annotations

import os
import tempfile
from contextlib import contextmanager
from typing import IO, Iterator

import numpy as np


def apply_default_permissions(fd: int) -> None:
    """Give a ``tempfile.mkstemp`` file (mode 0600) the usual ``0666 & ~umask`` permissions,
    so that files renamed into place stay readable by others (shared datasets, checkpoints)."""
    umask = os.umask(0)
    os.umask(umask)
    os.fchmod(fd, 0o666 & ~umask)


@contextmanager
def atomic_open(path: str, mode: str = "wb", encoding: str | None = None) -> Iterator[IO]:
    """Open a temporary file next to ``path``; on a clean exit it replaces ``path``."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix="." + os.path.basename(path) + ".", suffix=".tmp",
                               dir=folder)
    try:
        apply_default_permissions(fd)
        with os.fdopen(fd, mode, encoding=encoding) as fh:
            yield fh
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def write_bytes(path: str, data: bytes) -> None:
    with atomic_open(path, "wb") as fh:
        fh.write(data)


def write_text(path: str, text: str) -> None:
    with atomic_open(path, "w", encoding="utf-8") as fh:
        fh.write(text)


def save_npy(path: str, array: np.ndarray) -> None:
    with atomic_open(path, "wb") as fh:
        np.save(fh, array, allow_pickle=False)


def save_png(fig, path: str, dpi: int = 110) -> None:
    """A matplotlib figure as a PNG file, atomically."""
    with atomic_open(path, "wb") as fh:
        fig.savefig(fh, dpi=dpi, format="png")
