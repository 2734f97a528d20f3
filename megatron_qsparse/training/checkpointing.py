"""Save and resume through DeepSpeed's checkpoint engine, plus our own run metadata.

Layout under ``--save``: DeepSpeed's ``iter_0000100/`` tag folders and its ``latest`` pointer, and
inside each tag ``qsparse_meta.json`` (arguments, iteration, consumed samples), written atomically.
The RNG states of every rank travel in DeepSpeed's client state.
"""

from __future__ import annotations

import json
import logging
import os
import random
import tempfile

import numpy as np
import torch

from megatron_qsparse.config import Config, ConfigError

logger = logging.getLogger(__name__)

META_NAME = "qsparse_meta.json"


def tag_for(iteration: int) -> str:
    return f"iter_{iteration:07d}"


def atomic_write_text(path: str, text: str) -> None:
    """Write ``text`` to ``path`` via a temporary file in the same folder and a rename."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".tmp-", suffix=os.path.basename(path))
    try:
        with os.fdopen(fd, "w") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def rng_state() -> dict:
    np_state = np.random.get_state()
    return {
        "python": list(random.getstate()[1]) + [random.getstate()[2]],
        "python_version": random.getstate()[0],
        "numpy": {"keys": torch.from_numpy(np_state[1].astype(np.int64)), "pos": int(np_state[2]),
                  "has_gauss": int(np_state[3]), "cached_gaussian": float(np_state[4])},
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state() if torch.cuda.is_available() else None,
    }


def set_rng_state(state: dict) -> None:
    py = state["python"]
    random.setstate((state["python_version"], tuple(py[:-1]), py[-1]))
    n = state["numpy"]
    np.random.set_state(("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"],
                         n["has_gauss"], n["cached_gaussian"]))
    torch.set_rng_state(state["torch"])
    if state.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def save(engine, cfg: Config, iteration: int, consumed_samples: int) -> str:
    """Save a checkpoint for ``iteration``; DeepSpeed updates ``latest`` after the files."""
    tag = tag_for(iteration)
    client_state = {"iteration": iteration, "consumed_samples": consumed_samples,
                    "rng": rng_state()}
    engine.save_checkpoint(cfg.train.save, tag=tag, client_state=client_state)
    if torch.distributed.get_rank() == 0:
        meta = {"iteration": iteration, "consumed_samples": consumed_samples,
                "config": cfg.to_dict()}
        atomic_write_text(os.path.join(cfg.train.save, tag, META_NAME),
                          json.dumps(meta, indent=1, sort_keys=True))
    torch.distributed.barrier()
    logger.info("saved checkpoint %s at iteration %d", os.path.join(cfg.train.save, tag),
                iteration)
    return tag


def _check_compatible(cfg: Config, meta: dict, path: str) -> None:
    saved = meta.get("config", {}).get("model", {})
    for key in ("num_layers", "hidden_size", "ffn_hidden_size", "num_attention_heads",
                "num_query_groups", "kv_channels", "ffn_type", "vocab_size"):
        ours = getattr(cfg.model, key)
        if key in saved and saved[key] != ours and not (key.endswith("size") and ours is None):
            flag = "--" + key.replace("_", "-")
            raise ConfigError(f"--load: checkpoint {path} has {flag} {saved[key]} but this run "
                              f"has {ours}; use the checkpoint's model shape")


def load(engine, cfg: Config) -> tuple[int, int]:
    """Resume from ``--load``; returns (iteration, consumed samples), (0, 0) when there is none."""
    load_dir = cfg.train.load
    latest = os.path.join(load_dir, "latest")
    if not os.path.isfile(latest):
        logger.warning("--load %s holds no 'latest' checkpoint; starting from scratch", load_dir)
        return 0, 0
    with open(latest) as fh:
        tag = fh.read().strip()
    meta_path = os.path.join(load_dir, tag, META_NAME)
    if os.path.isfile(meta_path):
        with open(meta_path) as fh:
            _check_compatible(cfg, json.load(fh), os.path.join(load_dir, tag))
    path, client_state = engine.load_checkpoint(load_dir, tag=tag)
    if path is None:
        raise ConfigError(f"--load: could not read checkpoint {tag!r} in {load_dir}; "
                          "check the directory or remove its 'latest' file")
    if client_state.get("rng") is not None:
        set_rng_state(client_state["rng"])
    logger.info("resumed from %s at iteration %d", path, client_state["iteration"])
    return int(client_state["iteration"]), int(client_state["consumed_samples"])
