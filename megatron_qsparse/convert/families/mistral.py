"""Mistral (``MistralForCausalLM``): LLaMA's layout with sliding-window attention.

Quirk: ``sliding_window`` applies whenever it is set (no ``use_sliding_window`` switch).
Sliding-window attention is not implemented here, so the imported model gets
``max_position_embeddings = sliding_window``: no run can use sequences where the window would
matter (``--seq-length`` above it is rejected). An export keeps the field (null when unknown).
"""

from __future__ import annotations

from dataclasses import dataclass

from megatron_qsparse.convert.families.llama import LlamaFamily


@dataclass(frozen=True)
class MistralFamily(LlamaFamily):
    model_type: str = "mistral"
    architecture: str = "MistralForCausalLM"

    def sliding_window(self, hf: dict) -> int | None:
        return hf.get("sliding_window")

    def _export_fields(self, out: dict) -> None:
        out.setdefault("sliding_window", None)


MISTRAL = MistralFamily()
