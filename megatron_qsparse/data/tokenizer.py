"""Tokenizers: SentencePiece (LLaMA/Mistral-style ``.model`` files) and a byte-level one for tests.

Megatron-LM names are accepted by :func:`build_tokenizer`:

- ``SentencePieceTokenizer`` / ``GPTSentencePieceTokenizer``: plain SentencePiece ids, the end of
  document (``eod``) is the model's ``</s>`` (eos) id. (Megatron-LM's own
  ``SentencePieceTokenizer`` appends extra ``<EOD>``-style pieces for T5; we do not — for GPT
  pretraining its ``GPTSentencePieceTokenizer`` behaviour is the one wanted.)
- ``Llama2Tokenizer``: as above, but :meth:`~Tokenizer.tokenize` prepends ``<s>`` (bos), as
  Megatron-LM's ``Llama2Tokenizer`` does.
- ``ByteTokenizer``: UTF-8 bytes 0..255, ``256`` eod, ``257`` bos, ``258`` pad; needs no file.
- ``HuggingFaceTokenizer``: a ``transformers`` tokenizer saved in a local directory
  (``--tokenizer-model DIR`` with ``tokenizer.json``/``tokenizer_config.json``), e.g. Qwen's BPE;
  eod is its eos token. Nothing is downloaded.
"""

from __future__ import annotations

import abc
import logging
import os
from typing import Sequence

logger = logging.getLogger(__name__)

#: Accepted values of ``--tokenizer-type``.
TOKENIZER_TYPES: tuple[str, ...] = (
    "SentencePieceTokenizer",
    "GPTSentencePieceTokenizer",
    "Llama2Tokenizer",
    "ByteTokenizer",
    "HuggingFaceTokenizer",
)


class Tokenizer(abc.ABC):
    """Interface the data pipeline and training code rely on.

    Special ids that a tokenizer does not have are ``-1``.
    """

    @property
    @abc.abstractmethod
    def name(self) -> str:
        """Short description, e.g. ``SentencePieceTokenizer(kjv_sp4k.model)``."""

    @property
    @abc.abstractmethod
    def vocab_size(self) -> int:
        """Number of token ids (all ids are in ``[0, vocab_size)``)."""

    @property
    @abc.abstractmethod
    def eod(self) -> int:
        """End-of-document id appended by ``tools/preprocess_data.py --append-eod``."""

    @property
    def bos(self) -> int:
        """Beginning-of-sequence id, or -1."""
        return -1

    @property
    def pad(self) -> int:
        """Padding id, or -1."""
        return -1

    @abc.abstractmethod
    def tokenize(self, text: str) -> list[int]:
        """Token ids of ``text`` (no eod appended)."""

    @abc.abstractmethod
    def detokenize(self, ids: Sequence[int]) -> str:
        """Text of ``ids``; special ids decode to nothing."""

    def __repr__(self) -> str:
        return f"<{self.name} vocab_size={self.vocab_size} eod={self.eod} bos={self.bos}>"


class SentencePieceTokenizer(Tokenizer):
    """A SentencePiece model (e.g. LLaMA's or Mistral's ``tokenizer.model``, or ours).

    Args:
        model_path: the ``.model`` file.
        add_bos: prepend the bos id in :meth:`tokenize` (Megatron-LM's ``Llama2Tokenizer``).
    """

    def __init__(self, model_path: str, add_bos: bool = False):
        import sentencepiece as spm

        self.model_path = str(model_path)
        self.add_bos = bool(add_bos)
        if not os.path.isfile(self.model_path):
            raise ValueError(f"tokenizer model {self.model_path!r} not found; pass "
                             f"--tokenizer-model PATH to an existing SentencePiece .model file")
        self._sp = spm.SentencePieceProcessor()
        try:
            with open(self.model_path, "rb") as f:
                self._sp.LoadFromSerializedProto(f.read())
        except (OSError, RuntimeError) as e:
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise ValueError(f"tokenizer model {self.model_path!r} is not a readable "
                             f"SentencePiece model ({first}); pass --tokenizer-model a "
                             f"SentencePiece .model file") from None
        if self._sp.eos_id() < 0:
            raise ValueError(f"tokenizer model {self.model_path!r} has no eos piece, which is "
                             f"needed as end-of-document; use a model trained with eos_id >= 0")

    def __getstate__(self):
        return {"model_path": self.model_path, "add_bos": self.add_bos}

    def __setstate__(self, state) -> None:
        self.__init__(state["model_path"], state["add_bos"])

    @property
    def name(self) -> str:
        kind = "Llama2Tokenizer" if self.add_bos else "SentencePieceTokenizer"
        return f"{kind}({os.path.basename(self.model_path)})"

    @property
    def vocab_size(self) -> int:
        return int(self._sp.GetPieceSize())

    @property
    def eod(self) -> int:
        return int(self._sp.eos_id())

    @property
    def eos(self) -> int:
        """The model's ``</s>`` id (same as :attr:`eod`)."""
        return int(self._sp.eos_id())

    @property
    def bos(self) -> int:
        return int(self._sp.bos_id())

    @property
    def pad(self) -> int:
        return int(self._sp.pad_id())

    @property
    def unk(self) -> int:
        """The model's ``<unk>`` id, or -1."""
        return int(self._sp.unk_id())

    def id_to_piece(self, i: int) -> str:
        """The SentencePiece piece string of an id."""
        return self._sp.IdToPiece(int(i))

    def tokenize(self, text: str) -> list[int]:
        ids = self._sp.EncodeAsIds(text)
        if self.add_bos and self.bos >= 0:
            ids = [self.bos] + ids
        return ids

    def detokenize(self, ids: Sequence[int]) -> str:
        return self._sp.DecodeIds([int(i) for i in ids])


class ByteTokenizer(Tokenizer):
    """UTF-8 bytes as ids 0..255, plus 256 = eod (eos), 257 = bos, 258 = pad; vocab 259.

    Needs no model file; meant for tests and smoke runs.
    """

    EOD = 256
    BOS = 257
    PAD = 258

    @property
    def name(self) -> str:
        return "ByteTokenizer"

    @property
    def vocab_size(self) -> int:
        return 259

    @property
    def eod(self) -> int:
        return self.EOD

    @property
    def eos(self) -> int:
        """Same as :attr:`eod`."""
        return self.EOD

    @property
    def bos(self) -> int:
        return self.BOS

    @property
    def pad(self) -> int:
        return self.PAD

    def tokenize(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def detokenize(self, ids: Sequence[int]) -> str:
        return bytes(int(i) for i in ids if 0 <= int(i) < 256).decode("utf-8", errors="replace")


class HuggingFaceTokenizer(Tokenizer):
    """A ``transformers`` tokenizer from a local directory (``AutoTokenizer``, no download).

    :meth:`tokenize` adds no special tokens (the data tools add bos/eod themselves); special-token
    text such as Qwen's ``<|im_end|>`` maps to its id.
    """

    def __init__(self, path: str):
        self.path = str(path)
        if not os.path.isdir(self.path):
            raise ValueError(f"HuggingFaceTokenizer: {self.path!r} is not a directory; pass "
                             "--tokenizer-model DIR holding tokenizer.json/tokenizer_config.json")
        from transformers import AutoTokenizer

        try:
            self._tok = AutoTokenizer.from_pretrained(self.path, local_files_only=True)
        except (OSError, ValueError) as e:
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise ValueError(f"HuggingFaceTokenizer: cannot load a tokenizer from {self.path!r} "
                             f"({first}); save one there with save_pretrained") from None
        if self._tok.eos_token_id is None:
            raise ValueError(f"HuggingFaceTokenizer: {self.path!r} has no eos token, which is "
                             "needed as end-of-document; set eos_token in its tokenizer_config")

    def __getstate__(self):
        return {"path": self.path}

    def __setstate__(self, state) -> None:
        self.__init__(state["path"])

    @property
    def name(self) -> str:
        return f"HuggingFaceTokenizer({os.path.basename(os.path.normpath(self.path))})"

    @property
    def vocab_size(self) -> int:
        return len(self._tok)

    @property
    def eod(self) -> int:
        return int(self._tok.eos_token_id)

    @property
    def bos(self) -> int:
        return -1 if self._tok.bos_token_id is None else int(self._tok.bos_token_id)

    @property
    def pad(self) -> int:
        return -1 if self._tok.pad_token_id is None else int(self._tok.pad_token_id)

    def tokenize(self, text: str) -> list[int]:
        return list(self._tok.encode(text, add_special_tokens=False))

    def detokenize(self, ids: Sequence[int]) -> str:
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=True)


def build_tokenizer(tokenizer_type: str, tokenizer_model: str | None = None) -> Tokenizer:
    """Build a tokenizer from Megatron-LM style ``--tokenizer-type`` / ``--tokenizer-model``.

    Raises:
        ValueError: unknown type, or a SentencePiece type without a (readable) model file.
    """
    if tokenizer_type not in TOKENIZER_TYPES:
        raise ValueError(f"--tokenizer-type {tokenizer_type!r} is not supported; choose one of "
                         f"{', '.join(TOKENIZER_TYPES)}")
    if tokenizer_type == "ByteTokenizer":
        tokenizer: Tokenizer = ByteTokenizer()
    elif tokenizer_type == "HuggingFaceTokenizer":
        if not tokenizer_model:
            raise ValueError("--tokenizer-type HuggingFaceTokenizer needs --tokenizer-model DIR "
                             "(a directory with tokenizer.json/tokenizer_config.json)")
        tokenizer = HuggingFaceTokenizer(tokenizer_model)
    else:
        if not tokenizer_model:
            raise ValueError(f"--tokenizer-type {tokenizer_type} needs --tokenizer-model "
                             f"PATH.model (a SentencePiece model file)")
        tokenizer = SentencePieceTokenizer(tokenizer_model,
                                           add_bos=tokenizer_type == "Llama2Tokenizer")
    logger.debug("built tokenizer %r", tokenizer)
    return tokenizer
