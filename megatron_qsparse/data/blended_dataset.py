"""Weighted blending of datasets (Megatron-LM's greedy algorithm), with cached indices."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from typing import Sequence

import numpy as np
import torch

from megatron_qsparse.data.cache import CACHE_VERSION as _CACHE_VERSION
from megatron_qsparse.data.cache import save_npy_atomic as _save_npy_atomic
from megatron_qsparse.data.cache import save_text_atomic as _save_text_atomic

logger = logging.getLogger(__name__)


def blending_indices(weights: Sequence[float], size: int) -> tuple[np.ndarray, np.ndarray]:
    """Megatron's greedy blend: which dataset, and which of its samples, each blended sample uses.

    At step ``i`` the dataset whose count lags its target ``weight * (i + 1)`` the most is chosen
    (ties to the lowest index), so after any prefix of ``n`` samples every dataset has within one
    sample of ``weight * n``.

    Returns:
        ``(dataset_index int16/int32 [size], dataset_sample_index int64 [size])``.
    """
    w = [float(x) for x in weights]
    total = sum(w)
    w = [x / total for x in w]
    k = len(w)
    counts = [0] * k
    choice = [0] * size
    if k == 1:
        pass
    elif k == 2:
        w0, w1 = w
        c0 = c1 = 0
        for i in range(size):
            t = i + 1
            if w0 * t - c0 >= w1 * t - c1:
                c0 += 1
            else:
                choice[i] = 1
                c1 += 1
    elif k <= 32:
        order = range(1, k)
        for i in range(size):
            t = i + 1
            best, best_err = 0, w[0] * t - counts[0]
            for d in order:
                err = w[d] * t - counts[d]
                if err > best_err:
                    best, best_err = d, err
            choice[i] = best
            counts[best] += 1
    else:  # many datasets: one numpy argmax per step (same float ops, same first-max ties)
        wa, ca = np.asarray(w, dtype=np.float64), np.zeros(k, dtype=np.int64)
        for i in range(size):
            best = int(np.argmax(wa * (i + 1) - ca))
            choice[i] = best
            ca[best] += 1
    dataset_index = np.asarray(choice, dtype=np.int16 if k < 2 ** 15 else np.int32)
    # the j-th pick of dataset d uses its sample j
    order = np.argsort(dataset_index, kind="stable")
    firsts = np.zeros(k, dtype=np.int64)
    np.cumsum(np.bincount(dataset_index, minlength=k)[:-1], out=firsts[1:])
    dataset_sample_index = np.empty(size, dtype=np.int64)
    dataset_sample_index[order] = np.arange(size, dtype=np.int64) - firsts[dataset_index[order]]
    return dataset_index, dataset_sample_index


class BlendedDataset(torch.utils.data.Dataset):
    """Interleaves datasets by weight (Megatron's greedy blending); deterministic.

    The blending indices are cached like :class:`GPTDataset`'s (keyed by the weights, the size
    and every constituent's :attr:`GPTDataset.cache_key`), in ``cache_dir`` or else next to the
    first dataset's data; with constituents that have no ``cache_key`` they are always rebuilt.

    Args:
        datasets: the constituent datasets; dataset ``d`` must hold at least as many samples as
            the blend takes from it (``ceil(weight * size * 1.005)`` is always enough).
        weights: relative weights (normalised here).
        size: number of blended samples.
        cache_dir: where the index ``.npy`` files go (``None``: next to the first dataset).

    Attributes:
        loaded_from_cache: whether the blending indices were read from the cache.
    """

    def __init__(self, datasets: Sequence[torch.utils.data.Dataset], weights: Sequence[float],
                 size: int, cache_dir: str | None = None):
        super().__init__()
        if not datasets or len(datasets) != len(weights):
            raise ValueError(f"BlendedDataset needs one weight per dataset, got "
                             f"{len(datasets)} datasets and {len(weights)} weights")
        if any(w < 0 for w in weights) or sum(weights) <= 0:
            raise ValueError(f"blend weights must be >= 0 with a positive sum, got {list(weights)}")
        if size <= 0:
            raise ValueError(f"blend size must be positive, got {size}")
        self.datasets = list(datasets)
        total = float(sum(weights))
        self.weights = [float(w) / total for w in weights]
        self.size = int(size)
        start = time.perf_counter()
        self._cache_paths = self._cache_files(cache_dir)
        self.loaded_from_cache = self._load_cache()
        if not self.loaded_from_cache:
            self.dataset_index, self.dataset_sample_index = blending_indices(self.weights,
                                                                             self.size)
        counts = np.bincount(self.dataset_index, minlength=len(self.datasets))
        for d, (ds, n) in enumerate(zip(self.datasets, counts)):
            if n > len(ds):
                raise ValueError(f"blend takes {n} samples from dataset {d} ({ds!r}) which has "
                                 f"only {len(ds)}; build it with ceil(weight * size * 1.005) "
                                 f"samples")
        if not self.loaded_from_cache:
            self._save_cache()
        logger.info("blended %d samples from %d datasets (counts %s) in %.2f s%s", self.size,
                    len(self.datasets), counts.tolist(), time.perf_counter() - start,
                    " (cached)" if self.loaded_from_cache else "")

    def _cache_files(self, cache_dir: str | None) -> dict[str, str] | None:
        keys = [getattr(ds, "cache_key", None) for ds in self.datasets]
        if any(not isinstance(k, dict) for k in keys):
            return None
        if cache_dir is None:
            cache_dir = os.path.dirname(keys[0]["index_path"])
        key = {"version": _CACHE_VERSION, "class": type(self).__name__, "size": self.size,
               "weights": [repr(w) for w in self.weights], "datasets": keys}
        self._cache_key = key
        digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:20]
        base = os.path.join(cache_dir, f"blend_{digest}")
        return {"dir": cache_dir, "dataset": base + "_dataset_index.npy",
                "sample": base + "_dataset_sample_index.npy",
                "description": base + "_description.json"}

    def _load_cache(self) -> bool:
        paths = self._cache_paths
        if paths is None or not all(os.path.isfile(paths[k]) for k in ("dataset", "sample")):
            return False
        try:
            dataset = np.load(paths["dataset"], mmap_mode="r", allow_pickle=False)
            sample = np.load(paths["sample"], mmap_mode="r", allow_pickle=False)
            if dataset.shape != (self.size,) or sample.shape != (self.size,):
                raise ValueError("unexpected array shapes")
        except (OSError, ValueError) as e:
            logger.warning("ignoring unreadable blend cache %s (%s); rebuilding",
                           paths["dataset"], e)
            return False
        self.dataset_index, self.dataset_sample_index = dataset, sample
        return True

    def _save_cache(self) -> None:
        paths = self._cache_paths
        if paths is None:
            return
        try:
            os.makedirs(paths["dir"], exist_ok=True)
            _save_npy_atomic(paths["dataset"], self.dataset_index)
            _save_npy_atomic(paths["sample"], self.dataset_sample_index)
            _save_text_atomic(paths["description"], json.dumps(self._cache_key, indent=2) + "\n")
        except OSError as e:
            logger.warning("could not write the blend cache in %s (%s); indices stay in memory "
                           "only. Pass a writable directory as --data-cache-path.",
                           paths["dir"], e)

    @property
    def cache_files(self) -> list[str]:
        """Paths of the cached blending index files (empty when the blend is not cacheable)."""
        p = self._cache_paths
        return [] if p is None else [p["dataset"], p["sample"], p["description"]]

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, idx: int):
        i = int(idx)
        if i < 0:
            i += self.size
        if not 0 <= i < self.size:
            raise IndexError(f"sample {idx} out of range for {self.size} samples")
        return self.datasets[int(self.dataset_index[i])][int(self.dataset_sample_index[i])]

    def __repr__(self) -> str:
        return f"BlendedDataset(size={self.size}, weights={[round(w, 4) for w in self.weights]})"
