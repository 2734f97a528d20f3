"""megatron-qsparse: Megatron-LM/DeepSpeed-style pretraining of Q-Sparse (top-K activation-sparse) LLMs."""

__version__ = "0.1.0"
