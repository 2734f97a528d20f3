"""The sparsifier methods, one module each, registered by name (``--qsparse-mode``).

To add one, write a module here with a :class:`~.base.SparsityMethod` subclass decorated with
:func:`~.base.register`, and import it below (the one registry line). See README, "Adding a
sparsifier".
"""

from megatron_qsparse.sparsity.methods.base import (RowSlices, SparsityMethod, get_method,
                                                    method_names, register)
from megatron_qsparse.sparsity.methods import topk, block, relu, none, threshold  # noqa: F401,E401

__all__ = ["RowSlices", "SparsityMethod", "check_qsparse_config", "describe", "get_method",
           "method_names", "register", "summary"]


def describe(q) -> str:
    """One line naming a run's sparsifier (``q``: a QSparseConfig), e.g. ``topk S=0.4``; BitNet
    is appended when on."""
    return get_method(q.mode).describe(q) + (" + BitNet b1.58" if q.bitnet else "")


def summary(q) -> dict:
    """The sparsity fields of summary JSON files: ``qsparse_mode``, ``qsparse_ratio`` (None for
    methods without a ratio), ``qsparse_block``."""
    return get_method(q.mode).summary(q)


def check_qsparse_config(cfg, world_size=None) -> None:
    """The method-specific rules of a :class:`~megatron_qsparse.config.Config`: those every method
    shares through its class attributes, then the method's own ``check_config``."""
    from megatron_qsparse.config import PROJECTION_KINDS, ConfigError, flag_error

    q = cfg.qsparse
    try:
        method = get_method(q.mode)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    if not method.uses_ratio and any(getattr(q, f"{k}_ratio") is not None
                                     for k in PROJECTION_KINDS):
        raise flag_error("qsparse", "mode", f"per-projection ratios have no effect with mode "
                         f"{q.mode!r}", "drop the --qsparse-*-ratio flags or use --qsparse-mode "
                         "topk")
    if method.dense and q.warmup_iters:
        raise flag_error("qsparse", "warmup_iters", "a sparsity warm-up needs a sparsifier",
                         "set --qsparse-mode topk or drop --qsparse-warmup-iters")
    if q.rescale != "none" and not method.rescalable:
        raise flag_error("qsparse", "rescale", f"rescaling applies to top-K only, mode is "
                         f"{q.mode!r}", "use --qsparse-mode topk or --qsparse-rescale none")
    method.check_config(cfg, world_size)


def _register_config_check() -> None:
    from megatron_qsparse.config import register_check

    register_check(check_qsparse_config)


_register_config_check()
