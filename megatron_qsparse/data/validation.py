"""Checks of the data settings that need the data package: --data-path and --split syntax, and
the loss-mask files of ``--data-format sft``.

:func:`megatron_qsparse.config.validate` checks everything else (``config`` imports no package
module); callers run :func:`validate_data` right after it, as ``arguments.parse`` and
``training.setup`` do. Errors are :class:`~megatron_qsparse.config.ConfigError`, one line each.
"""

from __future__ import annotations

from megatron_qsparse.config import ConfigError, DataConfig, flag_of
from megatron_qsparse.data.gpt_dataset import parse_data_path, parse_split


def validate_data(d: DataConfig) -> DataConfig:
    """Raise :class:`ConfigError` if --data-path or --split does not parse, the split gives the
    training split nothing, or an SFT prefix lacks its files. Returns ``d``."""
    try:
        parse_data_path(list(d.data_path))
        train_share = parse_split(d.split)[0]
    except ValueError as e:
        raise ConfigError(str(e)) from None
    if train_share <= 0:
        raise ConfigError(f"{flag_of('data', 'split')}: {d.split!r} gives the training split no "
                          "documents; give the first (train) number a positive share, "
                          "e.g. 969,30,1")
    if d.data_format == "sft":
        from megatron_qsparse.data.sft_dataset import check_prefixes
        try:
            check_prefixes(list(d.data_path))
        except ValueError as e:
            raise ConfigError(f"{flag_of('data', 'data_format')}: {e}; or use --data-format gpt") \
                from None
    return d
