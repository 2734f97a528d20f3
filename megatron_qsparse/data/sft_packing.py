"""Packed SFT: several instruction samples per sequence (``--data-format sft --sft-packing``).

Each epoch visits the samples in a fresh seeded order (the same order as the padded
:class:`~megatron_qsparse.data.sft_dataset.SFTDataset`) and packs them, first-fit in that order,
into windows of ``seq_length + 1`` tokens (a sample longer than that is truncated and fills a
window alone). The windows of consecutive epochs follow each other until the dataset holds
``num_samples`` of them; the packing is computed once, deterministically, and cached as ``.npy``
files next to the data (or in ``--data-cache-path``), keyed like the GPT indices.

A window ``[s0 | s1 | ... | pad]`` becomes the sample

* ``tokens``: the samples back to back, then padding;
* ``loss_mask``: each sample's own mask (its response), 0 on padding, and 0 on the first token
  of every sample, so that the last token of one sample never learns to predict the next one;
* ``segment_ids``: ``0, 1, ...`` per sample, one more for the padding (attention stays inside
  each: ``model/masking.py``);
* ``position_ids``: restarting at 0 in every sample (and in the padding).

So every trained target sees exactly the context, positions and label it has when its sample is
run alone, and a packed batch gives each sample the loss (and gradient) of the padded one.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re

import numpy as np
import torch

from megatron_qsparse.data.cache import CACHE_VERSION, save_npy_atomic, save_text_atomic
from megatron_qsparse.data.indexed_dataset import IndexedDataset
from megatron_qsparse.data.sft_dataset import check_split, epoch_order

logger = logging.getLogger(__name__)


def first_fit(lengths: np.ndarray, capacity: int) -> np.ndarray:
    """The window of every item when ``lengths`` (each clipped to ``capacity``) are packed
    first-fit in the given order: each item goes into the lowest-numbered window with room for
    it. Windows are numbered in the order they are opened. O(n log n): a segment tree holds the
    largest free space below each node (unopened windows are empty ones)."""
    n = len(lengths)
    if n == 0:
        return np.zeros(0, dtype=np.int64)
    size = 1 << max(0, (n - 1).bit_length())
    tree = [int(capacity)] * (2 * size)
    out = [0] * n
    for i, length in enumerate(np.minimum(np.asarray(lengths, dtype=np.int64), capacity).tolist()):
        node = 1
        while node < size:  # descend to the leftmost leaf with room
            node = 2 * node if tree[2 * node] >= length else 2 * node + 1
        out[i] = node - size
        tree[node] -= length
        node //= 2
        while node:
            best = max(tree[2 * node], tree[2 * node + 1])
            if tree[node] == best:
                break
            tree[node] = best
            node //= 2
    return np.asarray(out, dtype=np.int64)


def pack_epoch(lengths: np.ndarray, capacity: int) -> tuple[np.ndarray, np.ndarray]:
    """``(items, offsets)``: window ``w`` holds ``items[offsets[w]:offsets[w + 1]]`` (indices
    into ``lengths``, in the order they were placed)."""
    windows = first_fit(lengths, capacity)
    items = np.argsort(windows, kind="stable")
    counts = np.bincount(windows, minlength=int(windows.max()) + 1 if len(windows) else 0)
    return items, np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)


class PackedSFTDataset(torch.utils.data.Dataset):
    """``num_samples`` packed sequences over ``document_ids`` (see the module docstring); item
    ``i`` is ``{"tokens", "loss_mask", "segment_ids", "position_ids"}``, ``seq_length + 1``
    int64 entries each.

    Attributes: ``samples_per_epoch``, ``sequences_per_epoch`` (windows of the first epoch),
    ``fill`` (fraction of the first epoch's window tokens that are sample tokens),
    ``loaded_from_cache``.
    """

    def __init__(self, tokens: IndexedDataset, mask: IndexedDataset, document_ids: np.ndarray,
                 num_samples: int, seq_length: int, seed: int, pad_id: int, name: str = "train",
                 cache_dir: str | None = None):
        check_split(tokens, mask, document_ids, name)
        self.tokens, self.mask, self.docs = tokens, mask, np.asarray(document_ids, np.int64)
        self.num_samples, self.seq_length, self.seed = int(num_samples), seq_length, seed
        self.pad_id, self.name = int(pad_id), name
        n = seq_length + 1
        self.lengths = np.minimum(np.asarray(tokens.sequence_lengths)[self.docs], n)
        self.truncated = int((np.asarray(tokens.sequence_lengths)[self.docs] > n).sum())
        if self.truncated:
            logger.warning("%s (%s): %d of %d samples are longer than --seq-length %d + 1 and "
                           "are truncated", tokens.prefix, name, self.truncated, len(self.docs),
                           seq_length)
        self.loaded_from_cache = False
        self._paths = self._cache_paths(cache_dir)
        if not self._load():
            self.pack_docs, self.pack_offsets, self.sequences_per_epoch = self._build()
            self._save()
        self.samples_per_epoch = len(self.docs)
        self.fill = float(self.lengths.sum()) / (self.sequences_per_epoch * n)
        logger.info("%s (%s): %d samples per epoch packed into %d sequences of %d tokens (%.1f%% "
                    "filled), %d sequences = %.2f epochs", tokens.prefix, name, len(self.docs),
                    self.sequences_per_epoch, n, 100 * self.fill, self.num_samples,
                    self.num_samples / self.sequences_per_epoch)

    # ------------------------------------------------------------------ packing and its cache
    def _build(self) -> tuple[np.ndarray, np.ndarray, int]:
        docs, offsets, total, epoch, first = [], [np.zeros(1, np.int64)], 0, 0, 0
        while total < self.num_samples:
            order = epoch_order(self.seed, epoch, len(self.docs))
            items, offs = pack_epoch(self.lengths[order], self.seq_length + 1)
            windows = len(offs) - 1
            first = first or windows
            keep = min(windows, self.num_samples - total)
            base = sum(len(d) for d in docs)
            docs.append(self.docs[order[items[:offs[keep]]]])
            offsets.append(offs[1:keep + 1] + base)
            total += keep
            epoch += 1
        return np.concatenate(docs), np.concatenate(offsets), first

    def _cache_paths(self, cache_dir: str | None) -> dict[str, str]:
        idx_path, idx_size, idx_mtime = self.tokens.index_fingerprint
        key = {"version": CACHE_VERSION, "class": type(self).__name__, "index_path": idx_path,
               "index_size": idx_size, "index_mtime_ns": idx_mtime,
               "documents_sha256": hashlib.sha256(self.docs.tobytes()).hexdigest(),
               "num_samples": self.num_samples, "seq_length": self.seq_length,
               "seed": self.seed}
        self._key = key
        digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:20]
        folder = cache_dir if cache_dir is not None else os.path.dirname(idx_path)
        base = os.path.join(folder, f"{os.path.basename(self.tokens.prefix)}_"
                                    f"{re.sub(r'[^A-Za-z0-9_.-]', '_', self.name)}_{digest}")
        return {"dir": folder, "docs": base + "_pack_docs.npy",
                "offsets": base + "_pack_offsets.npy", "description": base + "_pack.json"}

    def _load(self) -> bool:
        p = self._paths
        if not all(os.path.isfile(p[k]) for k in ("docs", "offsets", "description")):
            return False
        try:
            with open(p["description"]) as fh:
                per_epoch = int(json.load(fh)["sequences_per_epoch"])
            docs = np.load(p["docs"], mmap_mode="r", allow_pickle=False)
            offsets = np.load(p["offsets"], mmap_mode="r", allow_pickle=False)
            if offsets.shape != (self.num_samples + 1,) or docs.shape != (int(offsets[-1]),):
                raise ValueError("unexpected array shapes")
        except (OSError, ValueError, KeyError, TypeError) as e:
            logger.warning("%s: ignoring unreadable packing cache %s (%s); rebuilding",
                           self.name, p["docs"], e)
            return False
        self.pack_docs, self.pack_offsets, self.sequences_per_epoch = docs, offsets, per_epoch
        self.loaded_from_cache = True
        return True

    def _save(self) -> None:
        p = self._paths
        try:
            os.makedirs(p["dir"], exist_ok=True)
            save_npy_atomic(p["docs"], self.pack_docs)
            save_npy_atomic(p["offsets"], self.pack_offsets)
            save_text_atomic(p["description"], json.dumps(
                dict(self._key, name=self.name, sequences_per_epoch=self.sequences_per_epoch),
                indent=2) + "\n")
        except OSError as e:
            logger.warning("%s: could not write the packing cache in %s (%s); it stays in "
                           "memory. Pass a writable directory as --data-cache-path.",
                           self.name, p["dir"], e)

    @property
    def cache_files(self) -> list[str]:
        return [self._paths[k] for k in ("docs", "offsets", "description")]

    # ------------------------------------------------------------------ access
    def __len__(self) -> int:
        return self.num_samples

    def sample_documents(self, idx: int) -> np.ndarray:
        """The sample (document) ids packed into sequence ``idx``, in order."""
        return np.asarray(self.pack_docs[self.pack_offsets[idx]:self.pack_offsets[idx + 1]])

    def __getitem__(self, idx: int) -> dict[str, np.ndarray]:
        i = int(idx)
        if not 0 <= i < self.num_samples:
            raise IndexError(f"sample {idx} out of range for {self.num_samples} samples")
        n = self.seq_length + 1
        tokens = np.full(n, self.pad_id, dtype=np.int64)
        mask = np.zeros(n, dtype=np.int64)
        segments = np.zeros(n, dtype=np.int64)
        positions = np.zeros(n, dtype=np.int64)
        at = 0
        docs = self.sample_documents(i)
        for s, doc in enumerate(docs.tolist()):
            t = self.tokens.get(doc)[:n - at]
            m = self.mask.get(doc)[:len(t)]
            end = at + len(t)
            tokens[at:end], mask[at:end] = t, m
            mask[at] = 0  # no target crosses into this sample
            segments[at:end], positions[at:end] = s, np.arange(len(t))
            at = end
        segments[at:] = len(docs)
        positions[at:] = np.arange(n - at)
        return {"tokens": tokens, "loss_mask": mask, "segment_ids": segments,
                "position_ids": positions}

    def __repr__(self) -> str:
        return (f"PackedSFTDataset({self.tokens.prefix!r}, name={self.name!r}, sequences="
                f"{self.num_samples}, seq_length={self.seq_length}, fill={self.fill:.3f})")


__all__ = ["PackedSFTDataset", "first_fit", "pack_epoch"]
