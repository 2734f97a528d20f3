"""GPT pretraining samples over indexed datasets: splits, cached indices, blending.

Megatron-LM semantics, vectorised with numpy (no compiled helpers):

- A *document* is one sequence of the :class:`~.indexed_dataset.IndexedDataset` (what
  ``tools/preprocess_data.py`` writes per JSON line, eod included with ``--append-eod``).
- Each dataset's documents are split into contiguous train/valid/test ranges by ``--split``.
- :class:`GPTDataset` concatenates its documents, in a shuffled order, into one token stream,
  repeating (each epoch freshly shuffled) until it holds ``num_samples`` samples. Sample ``j`` of
  the stream is the window ``stream[j * seq_length : (j + 1) * seq_length + 1]``: consecutive
  samples share one token (the last label of one is the first input of the next) and samples
  cross document boundaries. The samples are then visited in a shuffled order.
- :class:`~.blended_dataset.BlendedDataset` interleaves several datasets by weight, greedily
  (re-exported here).

The three index arrays (document, sample, shuffle) are cached as ``.npy`` files keyed by a hash of
every parameter and of the ``.idx`` file's path, size and mtime, so a second run (or other ranks)
memory-map them instead of rebuilding.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import re
import time
from typing import Sequence

import numpy as np
import torch

from megatron_qsparse.data.blended_dataset import BlendedDataset, blending_indices
from megatron_qsparse.data.cache import CACHE_VERSION as _CACHE_VERSION
from megatron_qsparse.data.cache import save_npy_atomic as _save_npy_atomic
from megatron_qsparse.data.cache import save_text_atomic as _save_text_atomic
from megatron_qsparse.data.indexed_dataset import IndexedDataset

logger = logging.getLogger(__name__)

SPLIT_NAMES = ("train", "valid", "test")
__all__ = ["GPTDataset", "BlendedDataset", "blending_indices", "build_train_valid_test_datasets",
           "parse_data_path", "parse_split", "split_document_ranges", "SPLIT_NAMES"]


# ---------------------------------------------------------------------------------------------
# argument parsing
# ---------------------------------------------------------------------------------------------
def _as_float(s: str) -> float | None:
    try:
        value = float(s)
    except (TypeError, ValueError):
        return None
    return value if math.isfinite(value) else None


def parse_data_path(data_path: Sequence[str]) -> tuple[list[float], list[str]]:
    """Parse Megatron's ``--data-path`` into normalised weights and dataset prefixes.

    Accepted forms: ``[PREFIX]``; ``[P1, P2, ...]`` (equal weights); ``[W1, P1, W2, P2, ...]``.
    Weights must be non-negative numbers with a positive sum; they are normalised to sum to 1.

    Raises:
        ValueError: empty list, odd-length weighted list, non-numeric or negative weight,
            zero-sum weights, or numbers mixed into a prefix-only list.
    """
    items = [str(x) for x in data_path]
    if not items:
        raise ValueError("--data-path is empty; pass a dataset prefix (e.g. data/corpus_text_document)")
    if _as_float(items[0]) is None:  # prefixes only
        numeric = [p for p in items if _as_float(p) is not None]
        numeric_at = [k for k, p in enumerate(items) if _as_float(p) is not None]
        if numeric and len(items) % 2 == 0 and all(k % 2 == 0 for k in numeric_at):
            # 'W1 P1 W2 P2 ...' whose first weight(s) are not numbers, e.g. '0.3a a 0.7 b'
            bad = next(k for k in range(0, len(items), 2) if _as_float(items[k]) is None)
            raise ValueError(f"--data-path weight {items[bad]!r} (entry {bad + 1}) is not a "
                             f"number; use 'W1 P1 W2 P2 ...' with finite numbers as weights")
        if numeric:
            raise ValueError(f"--data-path mixes prefixes with the number {numeric[0]!r}; use "
                             f"either 'P1 P2 ...' or 'W1 P1 W2 P2 ...' (weights before every prefix)")
        return [1.0 / len(items)] * len(items), items
    if len(items) % 2:
        raise ValueError(f"--data-path has {len(items)} entries; the weighted form needs pairs "
                         f"'W1 P1 W2 P2 ...' (a weight before every prefix)")
    weights, prefixes = [], []
    for k in range(0, len(items), 2):
        w = _as_float(items[k])
        if w is None:
            raise ValueError(f"--data-path weight {items[k]!r} (entry {k + 1}) is not a number; "
                             f"use 'W1 P1 W2 P2 ...'")
        if w < 0:
            raise ValueError(f"--data-path weight {items[k]!r} for {items[k + 1]!r} is negative; "
                             f"weights must be >= 0")
        if _as_float(items[k + 1]) is not None:
            raise ValueError(f"--data-path entry {k + 2} ({items[k + 1]!r}) is a number where a "
                             f"prefix was expected; use 'W1 P1 W2 P2 ...' (write ./{items[k + 1]} "
                             f"for a prefix that looks like a number)")
        weights.append(w)
        prefixes.append(items[k + 1])
    total = sum(weights)
    if total <= 0:
        raise ValueError("--data-path weights sum to 0; give at least one dataset a positive weight")
    return [w / total for w in weights], prefixes


def parse_split(split: str) -> tuple[float, float, float]:
    """Parse ``--split`` (e.g. ``"969,30,1"``, ``"98/2/0"``, ``"1"``) into train/valid/test fractions.

    Missing trailing parts are 0 (``"98,2"`` = ``"98,2,0"``), as in Megatron-LM.

    Raises:
        ValueError: more than three parts, a non-numeric or negative part, or an all-zero split.
    """
    text = str(split).strip()
    parts = [p.strip() for p in re.split(r"[,/]", text)] if text else []
    if not parts or len(parts) > 3 or any(p == "" for p in parts):
        raise ValueError(f"--split {split!r} must be 1 to 3 numbers separated by ',' or '/', "
                         f"e.g. 969,30,1")
    values = []
    for p in parts:
        v = _as_float(p)
        if v is None:
            raise ValueError(f"--split {split!r}: {p!r} is not a number; use e.g. 969,30,1")
        if v < 0:
            raise ValueError(f"--split {split!r}: {p!r} is negative; proportions must be >= 0")
        values.append(v)
    values += [0.0] * (3 - len(values))
    total = sum(values)
    if total <= 0:
        raise ValueError(f"--split {split!r} sums to 0; give the train split a positive share")
    return tuple(v / total for v in values)  # type: ignore[return-value]


def split_document_ranges(split: Sequence[float], num_documents: int) -> list[int]:
    """Boundaries ``[0, a, b, num_documents]`` of the contiguous train/valid/test document ranges.

    Megatron-LM's rule: round each share of ``num_documents``, then shift so the last boundary is
    exactly ``num_documents`` (clipped to ``[0, num_documents]``).
    """
    bounds = [0]
    for frac in split:
        bounds.append(bounds[-1] + int(round(frac * float(num_documents))))
    diff = bounds[-1] - num_documents
    bounds = [0] + [min(max(b - diff, 0), num_documents) for b in bounds[1:]]
    for k in range(1, len(bounds)):  # keep monotone after clipping
        bounds[k] = max(bounds[k], bounds[k - 1])
    return bounds


def _smallest_int_dtype(max_value: int) -> type:
    return np.int32 if max_value < np.iinfo(np.int32).max else np.int64


# ---------------------------------------------------------------------------------------------
# datasets
# ---------------------------------------------------------------------------------------------
class GPTDataset(torch.utils.data.Dataset):
    """Fixed-length causal-LM samples drawn from a set of documents of an indexed dataset.

    ``ds[i]`` is ``{"tokens": int64 array of seq_length + 1}`` (inputs are ``tokens[:-1]``,
    labels ``tokens[1:]``). Deterministic for a given ``seed``.

    Args:
        indexed: the token data.
        document_ids: sequence indices of ``indexed`` that belong to this split.
        num_samples: number of samples (``len`` of the dataset); as many epochs as needed are used.
        seq_length: model sequence length.
        seed: seed of the document and sample shuffles.
        cache_dir: where the index ``.npy`` files go; ``None`` = next to the ``.bin``/``.idx``.
            If it is not writable the indices are kept in memory (with a warning).
        name: label used in messages and cache file names (``train``, ``valid``, ``test``).

    Attributes:
        document_index: document ids in stream order (all epochs, each shuffled).
        sample_index: ``[num_samples + 1, 2]`` (position in ``document_index``, token offset) of
            each sample's first token; sample ``j`` ends at entry ``j + 1`` inclusive.
        shuffle_index: order in which stream samples are served.
        loaded_from_cache: whether the indices were read from the cache.
    """

    def __init__(self, indexed: IndexedDataset, document_ids: np.ndarray, num_samples: int,
                 seq_length: int, seed: int, cache_dir: str | None = None, name: str = "train"):
        super().__init__()
        self.indexed = indexed
        self.name = str(name)
        self.num_samples = int(num_samples)
        self.seq_length = int(seq_length)
        self.seed = int(seed)
        where = f"{self.name} split of {indexed.prefix}"
        if self.seq_length <= 0:
            raise ValueError(f"{where}: seq_length must be positive, got {seq_length}")
        if self.num_samples <= 0:
            raise ValueError(f"{where}: num_samples must be positive, got {num_samples}")
        self.document_ids = np.asarray(document_ids, dtype=np.int64).reshape(-1)
        if self.document_ids.size == 0:
            raise ValueError(f"{where} has no documents; use more data or give this split a "
                             f"larger share in --split")
        if self.document_ids.min() < 0 or self.document_ids.max() >= len(indexed):
            raise ValueError(f"{where}: document ids out of range [0, {len(indexed)})")
        sizes = indexed.sequence_lengths
        self.tokens_per_epoch = int(sizes[self.document_ids].sum(dtype=np.int64))
        if self.tokens_per_epoch < self.seq_length + 1:
            raise ValueError(f"{where} has {self.tokens_per_epoch} tokens in "
                             f"{self.document_ids.size} documents, fewer than one sample "
                             f"(--seq-length {self.seq_length} + 1); use more data, a larger "
                             f"share in --split or a shorter --seq-length")
        needed = self.num_samples * self.seq_length + 1
        self.num_epochs = -(-needed // self.tokens_per_epoch)

        self.loaded_from_cache = False
        self._cache_paths = self._cache_files(cache_dir)
        if not self._load_cache():
            start = time.perf_counter()
            self.document_index, self.sample_index, self.shuffle_index = self._build_indices()
            logger.info("%s: built indices for %d samples (%d epoch(s), %d documents, %d tokens "
                        "per epoch) in %.2f s", where, self.num_samples, self.num_epochs,
                        self.document_ids.size, self.tokens_per_epoch,
                        time.perf_counter() - start)
            self._save_cache()

    # ------------------------------------------------------------------ indices
    def _build_indices(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        rng = np.random.RandomState(self.seed)
        sizes = self.indexed.sequence_lengths
        doc_dtype = _smallest_int_dtype(len(self.indexed))
        epochs = []
        for _ in range(self.num_epochs):
            order = self.document_ids.astype(doc_dtype, copy=True)
            rng.shuffle(order)
            epochs.append(order)
        document_index = np.concatenate(epochs)

        lengths = sizes[document_index].astype(np.int64)
        ends = np.cumsum(lengths)
        positions = np.arange(self.num_samples + 1, dtype=np.int64) * self.seq_length
        which = np.searchsorted(ends, positions, side="right")
        offsets = positions - (ends[which] - lengths[which])
        sample_index = np.stack([which, offsets], axis=1).astype(
            _smallest_int_dtype(max(int(ends[-1]), len(document_index))))

        shuffle_dtype = np.uint32 if self.num_samples < 2 ** 32 else np.int64
        shuffle_index = np.arange(self.num_samples, dtype=shuffle_dtype)
        rng.shuffle(shuffle_index)
        return document_index, sample_index, shuffle_index

    # ------------------------------------------------------------------ cache
    def _cache_files(self, cache_dir: str | None) -> dict[str, str]:
        idx_path, idx_size, idx_mtime = self.indexed.index_fingerprint
        key = {
            "version": _CACHE_VERSION,
            "class": type(self).__name__,
            "index_path": idx_path,
            "index_size": idx_size,
            "index_mtime_ns": idx_mtime,
            "documents_sha256": hashlib.sha256(self.document_ids.tobytes()).hexdigest(),
            "num_documents": int(self.document_ids.size),
            "num_samples": self.num_samples,
            "seq_length": self.seq_length,
            "seed": self.seed,
        }
        self._cache_key = key
        digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:20]
        directory = cache_dir if cache_dir is not None else os.path.dirname(idx_path)
        safe_name = re.sub(r"[^A-Za-z0-9_.-]", "_", self.name)
        base = os.path.join(directory, f"{os.path.basename(self.indexed.prefix)}_{safe_name}"
                                       f"_{digest}")
        return {"dir": directory, "document": base + "_doc_idx.npy",
                "sample": base + "_sample_idx.npy", "shuffle": base + "_shuffle_idx.npy",
                "description": base + "_description.json"}

    def _load_cache(self) -> bool:
        paths = self._cache_paths
        if not all(os.path.isfile(paths[k]) for k in ("document", "sample", "shuffle")):
            return False
        try:
            doc = np.load(paths["document"], mmap_mode="r", allow_pickle=False)
            sample = np.load(paths["sample"], mmap_mode="r", allow_pickle=False)
            shuffle = np.load(paths["shuffle"], mmap_mode="r", allow_pickle=False)
            if (doc.shape != (self.num_epochs * self.document_ids.size,)
                    or sample.shape != (self.num_samples + 1, 2)
                    or shuffle.shape != (self.num_samples,)):
                raise ValueError("unexpected array shapes")
        except (OSError, ValueError) as e:
            logger.warning("%s: ignoring unreadable index cache %s (%s); rebuilding",
                           self.name, paths["sample"], e)
            return False
        self.document_index, self.sample_index, self.shuffle_index = doc, sample, shuffle
        self.loaded_from_cache = True
        logger.info("%s split of %s: loaded indices from %s", self.name, self.indexed.prefix,
                    paths["sample"])
        return True

    def _save_cache(self) -> None:
        paths = self._cache_paths
        try:
            os.makedirs(paths["dir"], exist_ok=True)
            _save_npy_atomic(paths["document"], self.document_index)
            _save_npy_atomic(paths["sample"], self.sample_index)
            _save_npy_atomic(paths["shuffle"], self.shuffle_index)
            description = dict(self._cache_key, name=self.name, num_epochs=self.num_epochs,
                               tokens_per_epoch=self.tokens_per_epoch)
            _save_text_atomic(paths["description"], json.dumps(description, indent=2) + "\n")
        except OSError as e:
            logger.warning("%s: could not write the index cache in %s (%s); indices stay in "
                           "memory only. Pass a writable directory as --data-cache-path.",
                           self.name, paths["dir"], e)

    @property
    def cache_key(self) -> dict:
        """Everything the indices depend on (the cache is keyed by its hash)."""
        return dict(self._cache_key)

    @property
    def cache_files(self) -> list[str]:
        """Paths of the cached index files (which may not exist if the cache was not writable)."""
        return [self._cache_paths[k] for k in ("document", "sample", "shuffle", "description")]

    # ------------------------------------------------------------------ access
    def __len__(self) -> int:
        return self.num_samples

    def sample_tokens(self, stream_sample: int) -> np.ndarray:
        """Tokens of sample ``stream_sample`` in stream order (before the shuffle index)."""
        doc_f, off_f = (int(x) for x in self.sample_index[stream_sample])
        doc_l, off_l = (int(x) for x in self.sample_index[stream_sample + 1])
        get, docs = self.indexed.get, self.document_index
        if doc_f == doc_l:
            tokens = get(docs[doc_f], offset=off_f, length=off_l - off_f + 1)
        else:
            parts = [get(docs[doc_f], offset=off_f)]
            parts.extend(get(docs[k]) for k in range(doc_f + 1, doc_l))
            parts.append(get(docs[doc_l], offset=0, length=off_l + 1))
            tokens = np.concatenate(parts)
        return tokens.astype(np.int64)

    def __getitem__(self, idx: int) -> dict[str, np.ndarray]:
        i = int(idx)
        if i < 0:
            i += self.num_samples
        if not 0 <= i < self.num_samples:
            raise IndexError(f"sample {idx} out of range for {self.num_samples} samples")
        return {"tokens": self.sample_tokens(int(self.shuffle_index[i]))}

    def __repr__(self) -> str:
        return (f"GPTDataset({self.indexed.prefix!r}, name={self.name!r}, samples="
                f"{self.num_samples}, seq_length={self.seq_length}, epochs={self.num_epochs})")


def build_train_valid_test_datasets(
    data_path: list[str], split: str, seq_length: int, seed: int,
    num_samples: tuple[int, int, int], cache_dir: str | None = None,
) -> tuple[torch.utils.data.Dataset | None, torch.utils.data.Dataset | None,
           torch.utils.data.Dataset | None]:
    """Build the train, valid and test datasets from ``--data-path`` and ``--split``.

    Each dataset prefix's documents are split into contiguous ranges by ``split``; a
    :class:`GPTDataset` is built per split (per prefix), and several prefixes are blended with
    :class:`BlendedDataset` (each built with ``ceil(weight * n * 1.005)`` samples, Megatron's
    margin). A split gets ``None`` when its share is zero or it was asked for zero samples.

    Args:
        data_path: ``--data-path`` list (see :func:`parse_data_path`).
        split: ``--split`` string (see :func:`parse_split`).
        seq_length: model sequence length (samples hold ``seq_length + 1`` tokens).
        seed: data shuffling seed.
        num_samples: samples wanted for (train, valid, test).
        cache_dir: directory for cached indices (``None``: next to each dataset).
    """
    weights, prefixes = parse_data_path(data_path)
    fractions = parse_split(split)
    if len(num_samples) != 3 or any(int(n) < 0 for n in num_samples):
        raise ValueError(f"num_samples must be three non-negative counts, got {num_samples!r}")
    active = [(w, p) for w, p in zip(weights, prefixes) if w > 0]
    for w, p in zip(weights, prefixes):
        if w == 0:
            logger.info("skipping %s: weight 0 in --data-path", p)
    blend = len(active) > 1

    indexed = {p: IndexedDataset(p) for _, p in active}
    bounds = {p: split_document_ranges(fractions, len(ds)) for p, ds in indexed.items()}
    for p, b in bounds.items():
        logger.info("%s: %d documents split train/valid/test = %s", p, len(indexed[p]),
                    [b[k + 1] - b[k] for k in range(3)])

    result: list[torch.utils.data.Dataset | None] = []
    for s, name in enumerate(SPLIT_NAMES):
        n = int(num_samples[s])
        if fractions[s] == 0 or n == 0:
            result.append(None)
            continue
        parts = []
        for w, p in active:
            size = int(math.ceil(w * n * 1.005)) if blend else n
            doc_ids = np.arange(bounds[p][s], bounds[p][s + 1], dtype=np.int64)
            parts.append(GPTDataset(indexed[p], doc_ids, size, seq_length, seed,
                                    cache_dir=cache_dir, name=name))
        result.append(BlendedDataset(parts, [w for w, _ in active], n, cache_dir=cache_dir)
                      if blend else parts[0])
    return result[0], result[1], result[2]
