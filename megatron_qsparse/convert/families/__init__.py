"""Hugging Face model families, one adapter each, looked up by ``config.json``'s ``model_type``.

An adapter (:class:`HFFamily`) holds everything that is particular to one family: the config
mapping both ways, the weight-name mapping, and its quirks (Qwen2's q/k/v bias, Mistral's sliding
window). :mod:`megatron_qsparse.convert.hf` reads and writes directories through it and branches
on no family. A new family is one module here and one :func:`register` call below.
"""

from __future__ import annotations

from typing import Mapping, Protocol

from megatron_qsparse.config import Config, ModelConfig


class HFFamily(Protocol):
    """The adapter of one Hugging Face model family."""

    model_type: str
    """``config.json``'s ``model_type``: the registry key."""
    architecture: str
    """The ``transformers`` class written into ``architectures`` on export."""
    qkv_bias: bool
    """The q/k/v projections carry a bias (and no other projection does)."""
    projection_kinds: Mapping[str, str]
    """Hugging Face linear module name (``q_proj``, ...) -> our projection kind (``qkv``, ...)."""

    def model_config(self, hf: dict, seq_length: int | None = None) -> ModelConfig:
        """Our model shape for a ``config.json`` (ConfigError on what we cannot represent)."""

    def hf_config(self, cfg: Config, base: dict | None = None,
                  dtype: str = "float32") -> dict:
        """A ``config.json`` for our model (``base``: the imported original, whose other fields
        are kept); without our ``qsparse`` section, which :mod:`..hf` adds."""

    def name_map(self, m: ModelConfig) -> dict[str, list[str]]:
        """Our parameter name -> the Hugging Face tensors it is the row-concatenation of."""


FAMILIES: dict[str, HFFamily] = {}


def register(family: HFFamily) -> HFFamily:
    FAMILIES[family.model_type] = family
    return family


def get_family(model_type: str | None) -> HFFamily | None:
    """The adapter registered for ``model_type``, or None."""
    return FAMILIES.get(model_type)  # type: ignore[arg-type]


from megatron_qsparse.convert.families.llama import LLAMA  # noqa: E402
from megatron_qsparse.convert.families.mistral import MISTRAL  # noqa: E402
from megatron_qsparse.convert.families.qwen2 import QWEN2  # noqa: E402

for _family in (LLAMA, MISTRAL, QWEN2):
    register(_family)

__all__ = ["FAMILIES", "HFFamily", "LLAMA", "MISTRAL", "QWEN2", "get_family", "register"]
