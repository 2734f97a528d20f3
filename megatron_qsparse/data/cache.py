"""Atomic writes of cached index files (``.npy`` arrays and JSON descriptions)."""

from __future__ import annotations

import os
import tempfile

import numpy as np

from megatron_qsparse.data.indexed_dataset import apply_default_permissions

#: Bumped whenever the meaning of cached index files changes (part of every cache key).
CACHE_VERSION = 1


def save_npy_atomic(path: str, array: np.ndarray) -> None:
    """Write ``array`` to ``path`` via a temporary file in the same directory and a rename."""
    directory = os.path.dirname(path) or "."
    fd, tmp = tempfile.mkstemp(prefix="." + os.path.basename(path) + ".", suffix=".tmp",
                               dir=directory)
    try:
        apply_default_permissions(fd)
        with os.fdopen(fd, "wb") as f:
            np.save(f, array, allow_pickle=False)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def save_text_atomic(path: str, text: str) -> None:
    """Write ``text`` (UTF-8) to ``path`` via a temporary file and a rename."""
    directory = os.path.dirname(path) or "."
    fd, tmp = tempfile.mkstemp(prefix="." + os.path.basename(path) + ".", suffix=".tmp",
                               dir=directory)
    try:
        apply_default_permissions(fd)
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
