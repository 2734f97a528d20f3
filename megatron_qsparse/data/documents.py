"""Document boundaries inside a pretraining sequence: Megatron-LM's ``--reset-position-ids``,
``--reset-attention-mask`` and ``--eod-mask-loss``.

A GPT sample (``seq_length + 1`` tokens of the concatenated, shuffled documents) crosses
document boundaries; each document ends with the end-of-document token (``eod``, written by
``tools/preprocess_data.py --append-eod``). Megatron-LM's ``get_ltor_masks_and_position_ids``
(``megatron/core/datasets/gpt_dataset.py``) looks at the *inputs* ``tokens[:-1]``; for an eod at
input position ``i``:

* ``--reset-attention-mask``: positions ``> i`` do not attend to positions ``<= i`` (the eod
  belongs to the document it ends);
* ``--reset-position-ids``: positions restart at 0 at ``i + 1``;
* ``--eod-mask-loss``: the loss at input position ``i`` (predicting the token after the eod, the
  first token of the next document) is masked. Predicting the eod itself is still trained.

Here the same rules are written as per-token arrays of the sample (``seq_length + 1`` entries,
aligned with ``tokens``; the batch takes ``[:-1]`` of the position/segment ids for the inputs and
``[1:]`` of the loss mask for the targets, as for SFT data):

* ``segment_ids[k]`` = number of eods in ``tokens[:k]`` (the attention mask is "same segment and
  causal", built inside attention: ``model/masking.py``);
* ``position_ids[k]`` = ``k`` minus the start of its segment;
* ``loss_mask[k]`` = 0 where ``tokens[k - 1]`` is the eod (``loss_mask`` is the target's mask).

:class:`DocumentResetDataset` adds them to every sample of a GPT (or blended) dataset.
"""

from __future__ import annotations

import numpy as np
import torch

from megatron_qsparse.config import DOCUMENT_FIELDS


def segment_positions(segment_ids: np.ndarray) -> np.ndarray:
    """Positions restarting at 0 wherever ``segment_ids`` (non-decreasing, 1-D) changes."""
    n = len(segment_ids)
    idx = np.arange(n, dtype=np.int64)
    starts = np.zeros(n, dtype=bool)
    starts[0] = True
    starts[1:] = segment_ids[1:] != segment_ids[:-1]
    return idx - np.maximum.accumulate(np.where(starts, idx, 0))


def eod_document_fields(tokens: np.ndarray, eod: int, reset_position_ids: bool,
                        reset_attention_mask: bool, eod_mask_loss: bool) -> dict[str, np.ndarray]:
    """The arrays of one sample (``tokens``: ``seq_length + 1`` ids) that the flags ask for:
    ``position_ids``, ``segment_ids`` and ``loss_mask`` (int64, aligned with ``tokens``)."""
    tokens = np.asarray(tokens)
    is_eod = (tokens == eod).astype(np.int64)
    out = {}
    if reset_position_ids or reset_attention_mask:
        segments = np.cumsum(is_eod) - is_eod  # eods strictly before k
        if reset_position_ids:
            out["position_ids"] = segment_positions(segments)
        if reset_attention_mask:
            out["segment_ids"] = segments
    if eod_mask_loss:
        mask = np.ones(len(tokens), dtype=np.int64)
        mask[1:] = 1 - is_eod[:-1]
        out["loss_mask"] = mask
    return out


class DocumentResetDataset(torch.utils.data.Dataset):
    """``dataset``'s samples with the arrays of :func:`eod_document_fields` added."""

    def __init__(self, dataset, eod: int, reset_position_ids: bool = False,
                 reset_attention_mask: bool = False, eod_mask_loss: bool = False):
        self.dataset, self.eod = dataset, int(eod)
        self.flags = (bool(reset_position_ids), bool(reset_attention_mask), bool(eod_mask_loss))

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, idx: int) -> dict[str, np.ndarray]:
        sample = dict(self.dataset[idx])
        sample.update(eod_document_fields(sample["tokens"], self.eod, *self.flags))
        return sample

    def __repr__(self) -> str:
        names = ("reset_position_ids", "reset_attention_mask", "eod_mask_loss")
        on = ", ".join(n for n, f in zip(names, self.flags) if f)
        return f"DocumentResetDataset({self.dataset!r}, eod={self.eod}, {on})"


__all__ = ["DOCUMENT_FIELDS", "DocumentResetDataset", "eod_document_fields",
           "segment_positions"]
