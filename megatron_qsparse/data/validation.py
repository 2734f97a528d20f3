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


def token_id_range(prefix: str, cache_dir: str | None = None) -> tuple[int, int]:
    """(smallest, largest) token id in ``prefix.bin``, read once and cached next to the dataset's
    indices (``cache_dir``, else beside the ``.idx``), keyed by the files' size and mtime."""
    import hashlib
    import json
    import os

    import numpy as np

    from megatron_qsparse.data.cache import CACHE_VERSION, save_text_atomic
    from megatron_qsparse.data.indexed_dataset import IndexedDataset, data_file_path

    ds = IndexedDataset(prefix)
    idx_path, idx_size, idx_mtime = ds.index_fingerprint
    st = os.stat(data_file_path(prefix))
    key = {"version": CACHE_VERSION, "index_path": idx_path, "index_size": idx_size,
           "index_mtime_ns": idx_mtime, "bin_size": st.st_size, "bin_mtime_ns": st.st_mtime_ns}
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:20]
    folder = cache_dir if cache_dir is not None else os.path.dirname(idx_path)
    path = os.path.join(folder, f"{os.path.basename(prefix)}_token_range_{digest}.json")
    try:
        with open(path) as fh:
            cached = json.load(fh)
        return int(cached["min"]), int(cached["max"])
    except (OSError, ValueError, KeyError, TypeError):
        pass
    tokens = ds._bin
    lo, hi, chunk = 0, 0, 1 << 26
    if tokens.size:
        lo, hi = int(tokens[:1][0]), int(tokens[:1][0])
        for start in range(0, tokens.size, chunk):
            part = tokens[start:start + chunk]
            lo, hi = min(lo, int(np.min(part))), max(hi, int(np.max(part)))
    try:
        os.makedirs(folder, exist_ok=True)
        save_text_atomic(path, json.dumps(dict(key, min=lo, max=hi), indent=1) + "\n")
    except OSError:
        pass  # a read-only dataset folder: computed again next time
    return lo, hi


def check_token_ids(data_path, vocab_size: int, cache_dir: str | None = None) -> None:
    """ValueError naming the file, the id and the vocabulary when a dataset holds a token id the
    model's (padded) vocabulary has no embedding for; checked when the data is opened, not as an
    ``IndexError`` (a device-side assert on a GPU) in the middle of a step."""
    import numpy as np

    from megatron_qsparse.data.indexed_dataset import IndexedDataset, data_file_path

    _, prefixes = parse_data_path(list(data_path))
    for prefix in prefixes:
        dtype = IndexedDataset(prefix).dtype
        if np.issubdtype(dtype, np.unsignedinteger) and np.iinfo(dtype).max < vocab_size:
            continue  # every id the file can hold fits
        lo, hi = token_id_range(prefix, cache_dir)
        if lo < 0 or hi >= vocab_size:
            bad = lo if lo < 0 else hi
            raise ValueError(f"{data_file_path(prefix)} holds token id {bad}, outside the "
                             f"model's vocabulary of {vocab_size} ids (padded); preprocess it "
                             "with this run's tokenizer, or train with the tokenizer it was "
                             "made with")
