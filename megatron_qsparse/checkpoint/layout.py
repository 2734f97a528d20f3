"""The on-disk layout of our checkpoints: file and folder names, tags, ``latest``, the metadata.

Under a save directory::

    latest                  the tag of the newest complete checkpoint (replaced atomically, last)
    iter_0000100/           one checkpoint (tag ``iter_`` + the iteration, 7 digits or more)
        qsparse_meta.json   arguments, iteration, consumed samples, parallel layout (META_NAME)
        mp_rank_XX_model_states.pt            DeepSpeed's model file of model-parallel rank XX
        layer_II-model_RR-model_states.pt     under pipeline parallelism: layer II, TP rank RR
        layer_II_expert_JJ_mp_rank_XX_model_states.pt   MoE: expert JJ of layer II
        rng_rank00000.pt    RNG states of each rank (training resume only)
    .tmp-iter_0000100/      a checkpoint being written (renamed into place when complete)

Here only names are defined and metadata read (JSON); the tensors are read by
:mod:`megatron_qsparse.checkpoint.reader`, written by :mod:`megatron_qsparse.training.checkpointing`
(training) and :mod:`megatron_qsparse.convert.layout` (conversion).
"""

from __future__ import annotations

import glob
import json
import os
import re

from megatron_qsparse.config import ConfigError

META_NAME = "qsparse_meta.json"
LATEST = "latest"
TMP_PREFIX = ".tmp-"
TAG_RE = re.compile(r"^iter_(\d{7,})$")
MODEL_FILE = "mp_rank_{:02d}_model_states.pt"
LAYER_FILE = "layer_{:02d}-model_{:02d}-model_states.pt"
RNG_FILE = "rng_rank{:05d}.pt"


def tag_for(iteration: int) -> str:
    """The folder name (tag) of the checkpoint of ``iteration``."""
    return f"iter_{iteration:07d}"


def check_layout(tp: int, pp: int, what: str) -> None:
    """One-line errors for an impossible tensor x pipeline split (``what``: the flag's prefix)."""
    if tp < 1:
        raise ConfigError(f"--{what}tensor-parallel-size: got {tp}; use a positive integer")
    if pp < 1:
        raise ConfigError(f"--{what}pipeline-model-parallel-size: got {pp}; use a positive "
                          "integer")


def list_checkpoints(save_dir: str) -> list[tuple[int, str]]:
    """Complete checkpoints under ``save_dir`` as (iteration, tag), oldest first."""
    out = []
    for path in glob.glob(os.path.join(save_dir, "iter_*")):
        m = TAG_RE.match(os.path.basename(path))
        if m and os.path.isfile(os.path.join(path, META_NAME)):
            out.append((int(m.group(1)), os.path.basename(path)))
    return sorted(out)


def resolve_checkpoint(path: str) -> str:
    """``path`` may be a save directory (its ``latest`` is used) or one ``iter_*`` folder."""
    if os.path.isfile(os.path.join(path, META_NAME)):
        return path
    latest = os.path.join(path, LATEST)
    if os.path.isfile(latest):
        with open(latest) as fh:
            return os.path.join(path, fh.read().strip())
    raise ConfigError(f"--load: {path} is neither a checkpoint folder (with {META_NAME}) nor a "
                      f"save directory with a '{LATEST}' file")


def read_meta(path: str) -> tuple[str, dict]:
    """``(folder, metadata)`` of a checkpoint (a save directory or one ``iter_*`` folder)."""
    folder = resolve_checkpoint(path)
    with open(os.path.join(folder, META_NAME)) as fh:
        try:
            meta = json.load(fh)
        except json.JSONDecodeError as e:
            raise ConfigError(f"--load: {folder}/{META_NAME} is not valid JSON ({e}); the "
                              "checkpoint is corrupt") from None
    return folder, meta


__all__ = ["LATEST", "LAYER_FILE", "META_NAME", "MODEL_FILE", "RNG_FILE", "TAG_RE", "TMP_PREFIX",
           "check_layout", "list_checkpoints", "read_meta", "resolve_checkpoint", "tag_for"]
