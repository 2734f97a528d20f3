"""The LLaMA-style Q-Sparse model: transformer blocks and the GPT model."""

from megatron_qsparse.model.accounting import (activated_parameters, count_parameters,
                                               flops_per_token)
from megatron_qsparse.model.gpt import GPTModel
from megatron_qsparse.model.mlp import MLP
from megatron_qsparse.model.transformer import (Attention, LayerNorm, RMSNorm, RotaryEmbedding,
                                                TransformerBlock)

__all__ = ["GPTModel", "activated_parameters", "count_parameters", "flops_per_token", "MLP",
           "Attention", "LayerNorm", "RMSNorm", "RotaryEmbedding", "TransformerBlock"]
