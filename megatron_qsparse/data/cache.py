"""Cached index files (``.npy`` arrays and JSON descriptions), written atomically."""

from __future__ import annotations

from megatron_qsparse.atomic import save_npy as save_npy_atomic  # noqa: F401
from megatron_qsparse.atomic import write_text as save_text_atomic  # noqa: F401

#: Bumped whenever the meaning of cached index files changes (part of every cache key).
CACHE_VERSION = 1
