"""The training engine's save and resume through DeepSpeed's checkpoint engine, plus our own run
metadata, data position and RNG states (reading checkpoints outside training, and the names of
the files, are :mod:`megatron_qsparse.checkpoint`).

Layout under ``--save`` (:mod:`megatron_qsparse.checkpoint.layout`)::

    latest                  the tag of the newest complete checkpoint (replaced atomically, last)
    iter_0000100/           DeepSpeed's files (model, optimizer/ZeRO partitions, LR scheduler) and
        qsparse_meta.json   arguments, iteration, consumed samples, parallel layout
        rng_rank00000.pt    RNG states of each rank (tensors only)

A checkpoint is written into a hidden ``.tmp-iter_0000100`` folder and renamed into place only when
every rank has finished; ``latest`` is replaced after the rename. A crash at any point leaves the
previous checkpoint and ``latest`` intact. A checkpoint whose weights or optimizer state hold
NaN/Inf is never written (:class:`CheckpointNotWritten`; ``latest`` stays on the last good one),
and neither is one that fails for lack of space or permission: its partial folder is removed, and
the error names the cause in one line. Loading never unpickles arbitrary objects: DeepSpeed's
files are read with ``torch.load(weights_only=True)`` and an allow-list of its plain state classes.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import random
import shutil
import tempfile

import numpy as np
import torch

from megatron_qsparse.atomic import write_text as atomic_write_text
from megatron_qsparse.checkpoint.layout import (LATEST, META_NAME, RNG_FILE, TMP_PREFIX,
                                                list_checkpoints, tag_for)
from megatron_qsparse.checkpoint.safe import deepspeed_safe_globals
from megatron_qsparse.config import Config, ConfigError
from megatron_qsparse.parallel.state import get_parallel_state

logger = logging.getLogger(__name__)

# ---------------------------------------------------------------------------------------------
# RNG state (tensors and ints only, so that it loads with weights_only=True)


def rng_state() -> dict:
    version, mt, gauss = random.getstate()
    keys, pos, has_gauss, cached = np.random.get_state()[1:]
    return {
        "python_version": version, "python": torch.tensor(mt, dtype=torch.int64),
        "python_gauss": gauss,
        "numpy_keys": torch.from_numpy(keys.astype(np.int64)), "numpy_pos": int(pos),
        "numpy_has_gauss": int(has_gauss), "numpy_cached_gaussian": float(cached),
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state() if torch.cuda.is_available() else None,
        # the per-TP-rank dropout RNG (empty at TP = 1)
        "model_parallel": get_parallel_state().rng.get_states(),
    }


def set_rng_state(state: dict) -> None:
    random.setstate((state["python_version"], tuple(state["python"].tolist()),
                     state["python_gauss"]))
    np.random.set_state(("MT19937", state["numpy_keys"].numpy().astype(np.uint32),
                         state["numpy_pos"], state["numpy_has_gauss"],
                         state["numpy_cached_gaussian"]))
    torch.set_rng_state(state["torch"])
    if state.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
    if state.get("model_parallel"):
        get_parallel_state().rng.set_states(state["model_parallel"])


# ---------------------------------------------------------------------------------------------
# safe loading of DeepSpeed's files


def make_loading_safe(engine) -> None:
    """Make DeepSpeed read checkpoints with ``torch.load(weights_only=True)``."""
    ckpt_engine = getattr(engine, "checkpoint_engine", None)
    if ckpt_engine is None:
        return
    allowed = deepspeed_safe_globals()

    def safe_load(path: str, map_location=None):
        with torch.serialization.safe_globals(allowed):
            try:
                return torch.load(path, map_location=map_location, weights_only=True)
            except Exception as e:  # noqa: BLE001 - turn into a one-line, actionable error
                first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
                raise ConfigError(f"--load: cannot read {path} safely ({first}); it is corrupt or "
                                  "not a megatron-qsparse/DeepSpeed checkpoint") from None

    ckpt_engine.load = safe_load


# ---------------------------------------------------------------------------------------------
# save


class CheckpointNotWritten(RuntimeError):
    """A checkpoint was refused (non-finite state) or could not be written (no space, read-only,
    no permission); ``latest`` still names the last good one. The message says why, in one line."""


# errno -> what to do about it
_SPACE = {errno.ENOSPC, errno.EFBIG, errno.EDQUOT}
_ACCESS = {errno.EROFS, errno.EACCES, errno.EPERM}
# how torch.save's C++ writer reports a failed write (it does not keep the errno)
_WRITE_FAILURES = ("iostream error", "unexpected pos", "file write failed", "PytorchStreamWriter")


def check_save_dir(save_dir: str) -> None:
    """ConfigError unless ``--save`` is (or can be made) a directory this process can write to:
    checked at start, not at the first save an interval later."""
    try:
        os.makedirs(save_dir, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".write-test-", dir=save_dir)
        try:
            os.write(fd, b"x")
        finally:
            os.close(fd)
            os.remove(probe)
    except OSError as e:
        raise ConfigError(f"--save: cannot write to {save_dir} ({_describe_os_error(e)}); "
                          f"{_fix_for(e)}") from None


def _describe_os_error(e: OSError) -> str:
    name = errno.errorcode.get(e.errno or 0)
    return f"{e.strerror or e}" + (f", {name}" if name else "")


def _fix_for(e: OSError) -> str:
    if e.errno in _SPACE:
        return "free space there or point --save at a larger disk"
    return "point --save at a writable directory"


def _write_failure(e: BaseException, save_dir: str) -> str | None:
    """One line on why a save failed for want of space or access; None for other errors."""
    if isinstance(e, OSError) and e.errno is not None:
        return f"{_describe_os_error(e)}; {_fix_for(e)}"
    if isinstance(e, RuntimeError) and any(m in str(e) for m in _WRITE_FAILURES):
        try:
            free = f"{shutil.disk_usage(save_dir).free / 2**20:.1f} MiB free"
        except OSError:
            free = "free space unknown"
        first = str(e).strip().splitlines()[0]
        return (f"a write failed ({first!r}): the disk is probably full or over quota "
                f"({free}); free space there or point --save at a larger disk")
    return None


def _state_tensors(engine):
    """The tensors a checkpoint would hold: this rank's weights (its ZeRO-3 partition) and its
    optimizer state (ZeRO partitions, fp32 master copies, moments)."""
    for p in engine.module.parameters():
        yield "weights", getattr(p, "ds_tensor", p).detach()
    seen, opt = set(), getattr(engine, "optimizer", None)
    while opt is not None and id(opt) not in seen:
        seen.add(id(opt))
        state = getattr(opt, "state", None)
        if isinstance(state, dict):
            for st in state.values():
                if isinstance(st, dict):
                    for v in st.values():
                        if torch.is_tensor(v) and v.is_floating_point():
                            yield "optimizer state", v.detach()
        for group in getattr(opt, "param_groups", None) or []:
            for p in group.get("params", []) if isinstance(group, dict) else []:
                if torch.is_tensor(p):
                    yield "optimizer state", p.detach()
        opt = getattr(opt, "optimizer", None)


def non_finite_state(engine) -> str | None:
    """'weights' or 'optimizer state' if that holds NaN/Inf on any rank, else None (every rank
    must call this: the answer is agreed over all ranks)."""
    bad = {"weights": 0.0, "optimizer state": 0.0}
    for what, t in _state_tensors(engine):
        if t.numel() and not bad[what] and not bool(torch.isfinite(t).all()):
            bad[what] = 1.0
    if torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1:
        flags = torch.tensor([bad["weights"], bad["optimizer state"]], dtype=torch.float64)
        torch.distributed.all_reduce(flags, op=torch.distributed.ReduceOp.MAX)
        bad = dict(zip(bad, flags.tolist()))
    for what, flag in bad.items():
        if flag:
            return what
    return None


def _latest_tag(save_dir: str) -> str:
    try:
        with open(os.path.join(save_dir, LATEST)) as fh:
            return fh.read().strip() or "none"
    except OSError:
        return "none"


def _rank() -> int:
    return torch.distributed.get_rank() if torch.distributed.is_initialized() else 0


def _barrier() -> None:
    if torch.distributed.is_initialized():
        torch.distributed.barrier()


def save(engine, cfg: Config, iteration: int, consumed_samples: int, *, dp_size: int,
         extra: dict | None = None) -> str:
    """Save a complete checkpoint for ``iteration`` atomically, then point ``latest`` at it.

    Raises :class:`CheckpointNotWritten` (``latest`` untouched) when the weights or optimizer
    state hold NaN/Inf, or when the disk is full, read-only or not ours to write (the partial
    folder is removed)."""
    save_dir = cfg.train.save
    tag = tag_for(iteration)
    bad = non_finite_state(engine)
    if bad:
        raise CheckpointNotWritten(
            f"iteration {iteration}: the {bad} hold NaN/Inf, so no checkpoint was written "
            f"('{LATEST}' in {save_dir} stays at {_latest_tag(save_dir)}); lower --lr or raise "
            f"--lr-warmup-iters and resume from '{LATEST}'")
    tmp_dir = os.path.join(save_dir, TMP_PREFIX + tag)
    try:
        return _save(engine, cfg, iteration, consumed_samples, dp_size, extra)
    except (OSError, RuntimeError) as e:
        why = _write_failure(e, save_dir)
        shutil.rmtree(tmp_dir, ignore_errors=True)
        if why is None:
            raise
        raise CheckpointNotWritten(
            f"--save: could not write checkpoint {tag} to {save_dir}: {why}; the partial folder "
            f"was removed and '{LATEST}' stays at {_latest_tag(save_dir)}") from None


def _save(engine, cfg: Config, iteration: int, consumed_samples: int, dp_size: int,
          extra: dict | None) -> str:
    save_dir = cfg.train.save
    tag = tag_for(iteration)
    tmp_tag = TMP_PREFIX + tag
    rank = _rank()
    if rank == 0:
        os.makedirs(save_dir, exist_ok=True)
        shutil.rmtree(os.path.join(save_dir, tmp_tag), ignore_errors=True)  # an aborted save
    _barrier()
    engine.save_checkpoint(save_dir, tag=tmp_tag, save_latest=False,
                           client_state={"iteration": iteration,
                                         "consumed_samples": consumed_samples})
    tmp_dir = os.path.join(save_dir, tmp_tag)
    os.makedirs(tmp_dir, exist_ok=True)
    rng_path = os.path.join(tmp_dir, RNG_FILE.format(rank))
    torch.save(rng_state(), rng_path + ".part")
    os.replace(rng_path + ".part", rng_path)
    _barrier()
    if rank == 0:
        p = cfg.parallel
        meta = {"iteration": iteration, "consumed_samples": consumed_samples,
                "tensor_model_parallel_size": p.tensor_model_parallel_size,
                "pipeline_model_parallel_size": p.pipeline_model_parallel_size,
                "data_parallel_size": dp_size, "zero_stage": p.zero_stage,
                "config": cfg.to_dict(), **(extra or {})}
        atomic_write_text(os.path.join(tmp_dir, META_NAME),
                          json.dumps(meta, indent=1, sort_keys=True))
        final = os.path.join(save_dir, tag)
        if os.path.exists(final):  # re-saving the same iteration: replace the old one
            shutil.rmtree(final)
        os.replace(tmp_dir, final)
        atomic_write_text(os.path.join(save_dir, LATEST), tag)
        _prune(save_dir, cfg.train.keep_last_n_checkpoints)
    _barrier()
    logger.info("saved checkpoint %s at iteration %d", os.path.join(save_dir, tag), iteration)
    return tag


def _prune(save_dir: str, keep: int | None) -> None:
    if not keep:
        return
    for _, tag in list_checkpoints(save_dir)[:-keep]:
        shutil.rmtree(os.path.join(save_dir, tag), ignore_errors=True)
        logger.info("removed old checkpoint %s (--keep-last-n-checkpoints %d)", tag, keep)


# ---------------------------------------------------------------------------------------------
# load


def _check_compatible(cfg: Config, meta: dict, path: str, dp_size: int, finetune: bool) -> None:
    saved = meta.get("config", {}).get("model", {})
    for key in ("num_layers", "hidden_size", "ffn_hidden_size", "num_attention_heads",
                "num_query_groups", "kv_channels", "ffn_type", "vocab_size",
                "untie_embeddings_and_output_weights", "add_bias_linear", "normalization",
                "add_qkv_bias", "num_experts", "moe_router_topk", "moe_layer_freq"):
        ours = getattr(cfg.model, key)
        if key not in saved or saved[key] == ours or ours is None:
            continue
        flag = "--" + key.replace("_", "-")
        raise ConfigError(f"--load: checkpoint {path} has {flag} {saved[key]} but this run "
                          f"has {ours}; use the checkpoint's model shape")
    for key in ("tensor_model_parallel_size", "pipeline_model_parallel_size"):
        if key in meta and meta[key] != getattr(cfg.parallel, key):
            flag = "--" + key.replace("_", "-")
            raise ConfigError(f"--load: checkpoint {path} was saved with {flag} {meta[key]} but "
                              f"this run uses {getattr(cfg.parallel, key)}; launch with the "
                              "checkpoint's layout")
    if not finetune and meta.get("zero_stage", 0) >= 1 and meta.get("data_parallel_size") and \
            meta["data_parallel_size"] != dp_size:
        raise ConfigError(f"--load: checkpoint {path} holds ZeRO-{meta['zero_stage']} optimizer "
                          f"partitions for {meta['data_parallel_size']} data-parallel ranks but "
                          f"this run has {dp_size}; resume with the same number of ranks or use "
                          "--finetune to load the weights only")


def load(engine, cfg: Config, dp_size: int) -> tuple[int, int]:
    """Resume from ``--load``: returns (iteration, consumed samples); (0, 0) when there is none
    or with ``--finetune`` (weights only: optimizer, schedule, data position and RNG start anew)."""
    load_dir = cfg.train.load
    if not os.path.isdir(load_dir):
        raise ConfigError(f"--load: directory {load_dir!r} does not exist; check the path")
    latest = os.path.join(load_dir, LATEST)
    if not os.path.isfile(latest):
        if cfg.train.finetune:
            raise ConfigError(f"--load: {load_dir} holds no '{LATEST}' checkpoint to fine-tune "
                              "from; check the path")
        logger.warning("--load %s holds no '%s' checkpoint; starting from scratch", load_dir,
                       LATEST)
        return 0, 0
    with open(latest) as fh:
        tag = fh.read().strip()
    path = os.path.join(load_dir, tag)
    meta_path = os.path.join(path, META_NAME)
    if not os.path.isfile(meta_path):
        raise ConfigError(f"--load: {path} has no {META_NAME}; it is incomplete or not ours "
                          f"(point '{LATEST}' at a complete iter_* folder)")
    with open(meta_path) as fh:
        meta = json.load(fh)
    _check_compatible(cfg, meta, path, dp_size, cfg.train.finetune)
    make_loading_safe(engine)
    if cfg.train.finetune:
        loaded, _ = engine.load_checkpoint(load_dir, tag=tag, load_module_only=True,
                                           load_optimizer_states=False,
                                           load_lr_scheduler_states=False)
        if loaded is None:
            raise ConfigError(f"--load: could not read the weights in {path}")
        logger.info("fine-tuning from the weights of %s", path)
        return 0, 0
    loaded, client_state = engine.load_checkpoint(load_dir, tag=tag)
    if loaded is None:
        raise ConfigError(f"--load: could not read checkpoint {path}; check the directory")
    rng_path = os.path.join(path, RNG_FILE.format(_rank()))
    if os.path.isfile(rng_path):
        try:
            rng = torch.load(rng_path, weights_only=True)
            set_rng_state(rng)
        except Exception as e:  # noqa: BLE001 - a tampered or corrupt file: one clear line
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise ConfigError(f"--load: cannot read {rng_path} safely ({first[:200]}); it is "
                              "corrupt or not ours: restore it, or delete it to resume without "
                              "exact dropout replay") from None
    else:
        logger.warning("%s has no RNG state for rank %d; dropout will not replay exactly", path,
                       _rank())
    logger.info("resumed from %s at iteration %d", path, client_state["iteration"])
    return int(client_state["iteration"]), int(client_state["consumed_samples"])
