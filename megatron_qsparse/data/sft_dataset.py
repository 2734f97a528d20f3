"""Supervised fine-tuning data: instruction samples whose loss covers only the response.

``tools/preprocess_sft.py`` turns instruction jsonl into two Megatron indexed datasets with one
document per sample and identical lengths:

* ``PREFIX_sft.{bin,idx}``       tokens: ``[bos] prompt response [eos]``
* ``PREFIX_sft_mask.{bin,idx}``  uint8 loss mask, 1 on the response tokens (and the closing
  ``eos``: the model learns to stop), 0 on ``bos``, the system prompt, the question and the
  template around them.

Training with ``--data-format sft --data-path PREFIX_sft`` reads them with :class:`SFTDataset`:
one sample per sequence, truncated to ``seq_length + 1`` tokens and padded after its end (padding
has mask 0). No two samples share a sequence, so attention never crosses samples, at the cost of
the padded positions' compute. ``--sft-packing`` instead packs several samples into each sequence
(:class:`~megatron_qsparse.data.sft_packing.PackedSFTDataset`: attention and positions reset per
sample, the same per-sample loss). The training loop turns mask-0 targets into label ``-100`` and
averages the loss over the trained tokens only.

Record formats (per jsonl line): OpenOrca ``{"system_prompt", "question", "response"}``; generic
``{"input", "output"}`` with optional ``"system"``; Alpaca ``{"instruction", "input", "output"}``.
"""

from __future__ import annotations

import logging
import math
import os
from typing import Sequence

import numpy as np
import torch

from megatron_qsparse.data.blended_dataset import BlendedDataset
from megatron_qsparse.data.gpt_dataset import (SPLIT_NAMES, parse_data_path, parse_split,
                                               split_document_ranges)
from megatron_qsparse.data.indexed_dataset import IndexedDataset

logger = logging.getLogger(__name__)

MASK_SUFFIX = "_mask"

# prompt templates: (prompt with {system} and {question}, text after the response)
TEMPLATES = {
    # plain text, works with any base model's tokenizer (no special tokens needed)
    "alpaca": ("{system_block}### Instruction:\n{question}\n\n### Response:\n", ""),
    # ChatML (Qwen's chat format)
    "chatml": ("{system_block}<|im_start|>user\n{question}<|im_end|>\n<|im_start|>assistant\n",
               "<|im_end|>"),
}
_SYSTEM_BLOCK = {"alpaca": "{system}\n\n", "chatml": "<|im_start|>system\n{system}<|im_end|>\n"}


def record_fields(rec: dict) -> tuple[str, str, str]:
    """``(system, question, response)`` of one jsonl record; ValueError names what is missing."""
    if not isinstance(rec, dict):
        raise ValueError("the line is not a JSON object")
    system = rec.get("system_prompt") or rec.get("system") or ""
    if "question" in rec or "response" in rec:
        question, response = rec.get("question"), rec.get("response")
        keys = "'question'/'response' (OpenOrca)"
    else:
        question, response = rec.get("input"), rec.get("output")
        keys = "'input'/'output'"
        if rec.get("instruction"):
            question = rec["instruction"] + (f"\n\n{question}" if question else "")
    if not isinstance(question, str) or not question or not isinstance(response, str) \
            or not response:
        raise ValueError(f"needs non-empty string fields {keys}")
    if not isinstance(system, str):
        raise ValueError("'system_prompt' must be a string")
    return system, question, response


def render(template: str, system: str, question: str, response: str) -> tuple[str, str]:
    """``(prompt, completion)`` text of one sample under ``template``."""
    if template not in TEMPLATES:
        raise ValueError(f"--template {template!r} is not one of {sorted(TEMPLATES)}")
    prompt_t, end = TEMPLATES[template]
    block = _SYSTEM_BLOCK[template].format(system=system) if system else ""
    return prompt_t.format(system_block=block, question=question), response + end


def encode(tokenizer, prompt: str, completion: str, add_bos: bool = True
           ) -> tuple[list[int], list[int]]:
    """Tokens and loss mask: ``[bos] prompt`` (mask 0), ``completion eos`` (mask 1)."""
    head = ([tokenizer.bos] if add_bos and tokenizer.bos is not None and tokenizer.bos >= 0
            else []) + list(tokenizer.tokenize(prompt))
    tail = list(tokenizer.tokenize(completion)) + [tokenizer.eod]
    return head + tail, [0] * len(head) + [1] * len(tail)


def epoch_order(seed: int, epoch: int, n: int) -> np.ndarray:
    """The seeded order in which epoch ``epoch`` visits ``n`` samples (padded or packed)."""
    return np.random.default_rng([seed, epoch]).permutation(n)


def check_split(tokens: IndexedDataset, mask: IndexedDataset, document_ids: np.ndarray,
                name: str) -> None:
    """ValueError unless the tokens and the loss mask agree and the split holds samples."""
    if len(tokens) != len(mask):
        raise ValueError(f"{tokens.prefix} has {len(tokens)} samples but its loss mask "
                         f"{mask.prefix} has {len(mask)}; preprocess them again")
    if len(document_ids) == 0:
        raise ValueError(f"the {name} split of {tokens.prefix} has no samples")


class SFTDataset(torch.utils.data.Dataset):
    """``num_samples`` samples over ``document_ids``, epoch after epoch, each epoch in a fresh
    seeded order; sample ``i`` is ``{"tokens", "loss_mask"}`` of ``seq_length + 1`` entries."""

    def __init__(self, tokens: IndexedDataset, mask: IndexedDataset, document_ids: np.ndarray,
                 num_samples: int, seq_length: int, seed: int, pad_id: int, name: str = "train"):
        check_split(tokens, mask, document_ids, name)
        self.tokens, self.mask, self.docs = tokens, mask, np.asarray(document_ids, np.int64)
        self.num_samples, self.seq_length, self.seed = int(num_samples), seq_length, seed
        self.pad_id, self.name = int(pad_id), name
        self._orders: dict[int, np.ndarray] = {}
        lengths = np.asarray(tokens.sequence_lengths)[self.docs]
        self.truncated = int((lengths > seq_length + 1).sum())
        if self.truncated:
            logger.warning("%s (%s): %d of %d samples are longer than --seq-length %d + 1 and "
                           "are truncated", tokens.prefix, name, self.truncated, len(self.docs),
                           seq_length)
        logger.info("%s (%s): %d samples per epoch, %.2f epochs", tokens.prefix, name,
                    len(self.docs), self.num_samples / len(self.docs))

    def __len__(self) -> int:
        return self.num_samples

    def _order(self, epoch: int) -> np.ndarray:
        if epoch not in self._orders:  # keep one epoch cached
            self._orders = {epoch: epoch_order(self.seed, epoch, len(self.docs))}
        return self._orders[epoch]

    def __getitem__(self, idx: int) -> dict[str, np.ndarray]:
        i = int(idx)
        if not 0 <= i < self.num_samples:
            raise IndexError(f"sample {idx} out of range for {self.num_samples} samples")
        epoch, j = divmod(i, len(self.docs))
        doc = int(self.docs[self._order(epoch)[j]])
        n = self.seq_length + 1
        tokens = np.full(n, self.pad_id, dtype=np.int64)
        mask = np.zeros(n, dtype=np.int64)
        t = self.tokens.get(doc)[:n]
        m = self.mask.get(doc)[:n]
        tokens[:len(t)] = t
        mask[:len(m)] = m
        return {"tokens": tokens, "loss_mask": mask}


def check_prefixes(data_path: Sequence[str]) -> None:
    """ValueError naming the first ``--data-path`` prefix without its loss-mask files."""
    _, prefixes = parse_data_path(list(data_path))
    for p in prefixes:
        for q in (p, p + MASK_SUFFIX):
            if not os.path.isfile(q + ".idx"):
                raise ValueError(f"{q}.idx not found; preprocess instruction data with "
                                 "tools/preprocess_sft.py and pass its PREFIX_sft")


def build_sft_datasets(data_path: list[str], split: str, seq_length: int, seed: int,
                       num_samples: tuple[int, int, int], pad_id: int, cache_dir=None,
                       packing: bool = False):
    """Train/valid/test :class:`SFTDataset` (``packing``: :class:`~megatron_qsparse.data.
    sft_packing.PackedSFTDataset`; blended by weight when several prefixes are given), each split
    a contiguous range of every prefix's samples as ``--split`` says; a split that holds no
    samples is None. ``num_samples`` counts sequences (packed ones hold several samples)."""
    from megatron_qsparse.data.sft_packing import PackedSFTDataset

    weights, prefixes = parse_data_path(data_path)
    fractions = parse_split(split)
    active = [(w, p) for w, p in zip(weights, prefixes) if w > 0]
    opened = {p: (IndexedDataset(p), IndexedDataset(p + MASK_SUFFIX)) for _, p in active}
    bounds = {p: split_document_ranges(fractions, len(ds[0])) for p, ds in opened.items()}
    out = []
    for s, name in enumerate(SPLIT_NAMES):
        n = int(num_samples[s])
        if fractions[s] == 0 or n == 0:
            out.append(None)
            continue
        parts, kept = [], []
        for w, p in active:
            size = int(math.ceil(w * n * 1.005)) if len(active) > 1 else n
            docs = np.arange(bounds[p][s], bounds[p][s + 1], dtype=np.int64)
            if len(docs) == 0:
                logger.warning("%s: the %s split of --split %s holds no samples", p, name, split)
                continue
            if packing:
                parts.append(PackedSFTDataset(*opened[p], docs, size, seq_length, seed + s,
                                              pad_id, name, cache_dir=cache_dir))
            else:
                parts.append(SFTDataset(*opened[p], docs, size, seq_length, seed + s, pad_id,
                                        name))
            kept.append(w)
        if not parts:
            out.append(None)
            continue
        out.append(BlendedDataset(parts, kept, n, cache_dir=cache_dir)
                   if len(parts) > 1 else parts[0])
    return out[0], out[1], out[2]


__all__ = ["MASK_SUFFIX", "SFTDataset", "TEMPLATES", "build_sft_datasets", "check_prefixes",
           "encode", "epoch_order", "record_fields", "render"]
