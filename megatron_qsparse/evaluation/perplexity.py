"""Sliding-window perplexity and bits per byte of a token stream, with measured density.

The stream is ``[eod] doc_1 [eod] doc_2 [eod] ...`` — documents as they were trained (each ends
with the end-of-document token, and the leading ``eod`` gives the first token a context), so every
token of the text and every document-ending ``eod`` is scored exactly once.

Windows (the standard Hugging Face perplexity recipe, ``L = seq_length``, ``stride ≤ L``): window
``w`` feeds stream tokens ``[w·stride, w·stride + L)`` and predicts the next token at each
position; the first window scores all its predictions, every later window only those it has not
scored yet (its last ``stride``). So each token is scored once, with at least ``L − stride``
tokens of context once the stream is long enough (``stride = L``: disjoint windows, the cheapest
and the least context). Full windows run in batches; the shorter last window runs alone, so no
padding enters the model (nor the measured density).

``bits per byte = total NLL / ln 2 / UTF-8 bytes of the text`` (the ``eod`` tokens count in the
NLL: they are part of the text's encoding, as a document boundary).
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import asdict, dataclass, field
from typing import Iterable, Iterator, Sequence

import numpy as np
import torch

from megatron_qsparse.config import ConfigError

logger = logging.getLogger(__name__)


@dataclass
class PerplexityResult:
    """Totals of one evaluation; ``density`` is :func:`~megatron_qsparse.sparsity.collect_density`
    of the run (``kind/<kind>`` and ``layer<i>/<kind>``)."""

    tokens: int
    nll_sum: float
    windows: int
    seq_length: int
    stride: int
    bytes: int | None = None
    documents: int | None = None
    density: dict = field(default_factory=dict)

    @property
    def mean_nll(self) -> float:
        return self.nll_sum / self.tokens if self.tokens else float("nan")

    @property
    def perplexity(self) -> float:
        return math.exp(self.mean_nll)

    @property
    def bits_per_byte(self) -> float | None:
        if not self.bytes:
            return None
        return self.nll_sum / math.log(2) / self.bytes

    def to_dict(self) -> dict:
        d = asdict(self)
        d.update(mean_nll=self.mean_nll, perplexity=self.perplexity,
                 bits_per_byte=self.bits_per_byte)
        return d


def window_plan(n_tokens: int, seq_length: int, stride: int) -> list[tuple[int, int, int]]:
    """``(begin, end, first_scored)`` of each window over a stream of ``n_tokens``: inputs are
    tokens ``[begin, end - 1)``, targets ``[begin + 1, end)``, of which those at stream index
    ``>= first_scored`` are scored."""
    if seq_length < 1:
        raise ConfigError(f"--seq-length: got {seq_length}; use a positive length")
    if not 1 <= stride <= seq_length:
        raise ConfigError(f"--stride: {stride} is outside [1, --seq-length {seq_length}]; a "
                          "larger stride would leave tokens unscored")
    plan: list[tuple[int, int, int]] = []
    scored_to = 1  # stream index of the next target to score
    begin = 0
    while scored_to < n_tokens:
        end = min(begin + seq_length + 1, n_tokens)
        plan.append((begin, end, scored_to))
        scored_to = end
        begin += stride
    return plan


@torch.no_grad()
def sliding_window_nll(model: torch.nn.Module, stream: Sequence[int] | np.ndarray,
                       seq_length: int, stride: int | None = None, batch_size: int = 1,
                       device: str | torch.device = "cpu") -> PerplexityResult:
    """Score ``stream`` with ``model`` (:class:`~megatron_qsparse.model.gpt.GPTModel`, any TP
    layout: every TP rank gets the same totals) and record the density it produced."""
    from megatron_qsparse.sparsity import collect_density, recording, reset_density

    stride = seq_length if stride is None else int(stride)
    if batch_size < 1:
        raise ConfigError(f"--micro-batch-size: got {batch_size}; use a positive number")
    tokens = torch.as_tensor(np.asarray(stream, dtype=np.int64))
    plan = window_plan(len(tokens), seq_length, stride)
    nll = torch.zeros((), dtype=torch.float64)
    scored = 0
    reset_density(model)
    with recording(model, True):
        full = [w for w in plan if w[1] - w[0] == seq_length + 1]
        short = [w for w in plan if w[1] - w[0] != seq_length + 1]
        for i in range(0, len(full), batch_size):
            group = full[i:i + batch_size]
            nll_b, n_b = _score(model, tokens, group, device)
            nll += nll_b
            scored += n_b
        for w in short:
            nll_b, n_b = _score(model, tokens, [w], device)
            nll += nll_b
            scored += n_b
    assert scored == max(len(tokens) - 1, 0), (scored, len(tokens))
    return PerplexityResult(tokens=scored, nll_sum=float(nll), windows=len(plan),
                            seq_length=seq_length, stride=stride,
                            density=collect_density(model))


def _score(model, tokens: torch.Tensor, group: list[tuple[int, int, int]],
           device) -> tuple[torch.Tensor, int]:
    batch = torch.stack([tokens[b:e] for b, e, _ in group]).to(device)
    losses = model(batch[:, :-1], batch[:, 1:])  # [b, s] fp32 per-token NLL
    mask = torch.zeros_like(losses, dtype=torch.bool)
    for row, (b, e, first) in enumerate(group):
        mask[row, first - b - 1:] = True  # target at stream index t sits at position t - b - 1
    return losses.double()[mask].sum().cpu(), int(mask.sum())


# ---------------------------------------------------------------------------------------------
# building the stream


@dataclass
class TokenStream:
    """``[eod] doc [eod] doc [eod] ...`` as int64, the UTF-8 bytes of the documents' text and the
    number of documents (the last one possibly cut by ``max_tokens``)."""

    tokens: np.ndarray
    bytes: int
    documents: int


def _stream(docs: Iterable[tuple[list[int] | np.ndarray, int | None]], tokenizer,
            max_tokens: int | None) -> TokenStream:
    eod = tokenizer.eod
    parts: list[np.ndarray] = [np.array([eod], dtype=np.int64)]
    total, nbytes, ndocs = 1, 0, 0
    for ids, doc_bytes in docs:
        ids = np.asarray(ids, dtype=np.int64)
        body = ids[:-1] if len(ids) and ids[-1] == eod else ids
        ids = np.concatenate([body, [eod]]).astype(np.int64)
        if max_tokens is not None and total + len(ids) > max_tokens:
            keep = max_tokens - total
            if keep <= 0:
                break
            body = ids = ids[:keep]  # keep <= len(body): the eod is cut off
            doc_bytes = None  # cut: count the bytes of what is kept
        if doc_bytes is None:
            doc_bytes = len(tokenizer.detokenize(body.tolist()).encode("utf-8"))
        parts.append(ids)
        total += len(ids)
        nbytes += int(doc_bytes)
        ndocs += 1
        if max_tokens is not None and total >= max_tokens:
            break
    return TokenStream(np.concatenate(parts), nbytes, ndocs)


def jsonl_stream(path: str, tokenizer, text_key: str = "text",
                 max_tokens: int | None = None) -> TokenStream:
    """Documents of a JSON-lines file (``{text_key: ...}`` per line), tokenized; bytes are those
    of the text itself."""

    def docs() -> Iterator[tuple[list[int], int]]:
        with open(path, encoding="utf-8") as fh:
            for lineno, line in enumerate(fh, 1):
                if not line.strip():
                    continue
                try:
                    obj = json.loads(line)
                except json.JSONDecodeError as e:
                    raise ConfigError(f"--jsonl: {path}:{lineno}: not JSON ({e.msg}); fix the "
                                      "line") from None
                text = obj.get(text_key) if isinstance(obj, dict) else None
                if not isinstance(text, str):
                    raise ConfigError(f"--jsonl: {path}:{lineno}: no string field "
                                      f"{text_key!r}; pass --text-key with the field's name")
                yield tokenizer.tokenize(text), len(text.encode("utf-8"))

    try:
        return _stream(docs(), tokenizer, max_tokens)
    except FileNotFoundError:
        raise ConfigError(f"--jsonl: {path} not found; check the path") from None


def indexed_stream(prefix: str, tokenizer, document_range: tuple[int, int] | None = None,
                   max_tokens: int | None = None) -> TokenStream:
    """Documents ``document_range`` (default all) of a preprocessed ``.bin/.idx`` dataset; bytes
    are those of the documents decoded with ``tokenizer`` (SentencePiece decoding is the text up
    to whitespace normalisation)."""
    from megatron_qsparse.data.indexed_dataset import IndexedDataset

    if not IndexedDataset.exists(prefix):
        raise ConfigError(f"--data-path: {prefix}.bin/.idx not found; give the prefix "
                          "tools/preprocess_data.py wrote (e.g. data/corpus_text_document)")
    ds = IndexedDataset(prefix)
    doc_idx = ds.document_indices
    lo, hi = document_range or (0, len(doc_idx) - 1)

    def docs() -> Iterator[tuple[np.ndarray, None]]:
        for d in range(lo, hi):
            seqs = [ds[s] for s in range(int(doc_idx[d]), int(doc_idx[d + 1]))]
            yield (np.concatenate(seqs) if seqs else np.zeros(0, np.int64)), None

    return _stream(docs(), tokenizer, max_tokens)
