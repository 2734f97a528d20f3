"""Qwen2 (``Qwen2ForCausalLM``): LLaMA's layout with a bias on the q/k/v projections only.

Quirks: the q/k/v bias (our ``--add-qkv-bias``; a model without it exports as llama), and a
sliding window only when ``use_sliding_window`` is set (handled as in :mod:`.mistral`).
"""

from __future__ import annotations

from dataclasses import dataclass

from megatron_qsparse.convert.families.llama import LlamaFamily


@dataclass(frozen=True)
class Qwen2Family(LlamaFamily):
    model_type: str = "qwen2"
    architecture: str = "Qwen2ForCausalLM"
    qkv_bias: bool = True

    def _export_fields(self, out: dict) -> None:
        pass  # no attention_bias/mlp_bias fields: the q/k/v bias comes with the model type


QWEN2 = Qwen2Family()
