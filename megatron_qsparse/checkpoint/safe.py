"""Safe loading of checkpoint files: the allow-list of DeepSpeed's plain state classes.

Our checkpoints are read with ``torch.load(weights_only=True)``, which unpickles tensors and
containers only; DeepSpeed's files also hold a few plain state holders (loss scalers, the ZeRO
stage enum, fragment addresses), allowed here by name. No other object is ever unpickled, so a
checkpoint from elsewhere cannot run code.
"""

from __future__ import annotations


def deepspeed_safe_globals() -> list:
    """Plain state holders DeepSpeed pickles into its checkpoints (no code runs on load)."""
    out = []
    try:
        from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
        out += [LossScaler, DynamicLossScaler]
    except ImportError:  # pragma: no cover - depends on the DeepSpeed version
        pass
    try:
        from deepspeed.runtime.zero.config import ZeroStageEnum
        out.append(ZeroStageEnum)
    except ImportError:  # pragma: no cover
        pass
    try:
        from deepspeed.utils.tensor_fragment import fragment_address
        out.append(fragment_address)
    except ImportError:  # pragma: no cover
        pass
    return out


__all__ = ["deepspeed_safe_globals"]
