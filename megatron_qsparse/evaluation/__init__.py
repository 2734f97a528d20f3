"""Evaluating checkpoints: perplexity / bits per byte and an lm-evaluation-harness adapter.

- :mod:`.loading`: a checkpoint's model (any tensor-parallel layout; merged to one shard or loaded
  as this rank's shard) with an optional sparsity override, and its tokenizer.
- :mod:`.perplexity`: sliding-window perplexity of a token stream with measured density.
- :mod:`.lm_eval_adapter`: ``QSparseLM``, registered with ``lm_eval`` as ``qsparse`` (imported
  lazily: ``lm_eval`` is needed only for it).
"""

from megatron_qsparse.evaluation.loading import (EvalModel, apply_sparsity_override,
                                                 build_eval_tokenizer, load_for_eval)
from megatron_qsparse.evaluation.perplexity import PerplexityResult, sliding_window_nll

__all__ = ["EvalModel", "PerplexityResult", "apply_sparsity_override", "build_eval_tokenizer",
           "load_for_eval", "sliding_window_nll"]
