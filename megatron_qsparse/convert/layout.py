"""Our checkpoint folders for one parallel layout <-> a stream of full (TP = 1) tensors.

This is the seam between the *model* and its *layout* in checkpoint conversion:

* a **tensor source** is a zero-argument callable returning an iterator of ``(name, tensor)``
  pairs, in our parameter naming (``embedding.weight``, ``layers.0.attention.qkv.weight``, ...),
  each tensor the full (unsharded) parameter. It can be iterated several times and yields one
  tensor at a time (a Hugging Face directory read lazily, or an existing checkpoint memory-mapped);
* :func:`write_checkpoint` cuts such a stream into the files of a layout: one
  ``mp_rank_XX_model_states.pt`` per TP rank, or under pipeline parallelism DeepSpeed's per-layer
  files ``layer_II-model_RR-model_states.pt`` (layer ``II`` of the layer sequence, TP rank ``RR``;
  the same files whatever the stage count) plus one ``mp_rank_XX`` file per model-parallel rank;
* :func:`read_checkpoint` turns a checkpoint folder of any supported layout back into a source.

Peak memory of a write is about one TP rank's shard plus one full tensor: the ranks are written one
after the other, each from a fresh pass over the source (a source is re-read ``tp`` times rather
than held in memory). Reading memory-maps every rank's file (``torch.load(mmap=True)``) and merges
one tensor at a time.

The files are what :mod:`megatron_qsparse.training.checkpointing` writes, so
``pretrain_qsparse.py --load DIR --finetune`` (weights only) starts from a converted checkpoint at
the same TP size, and ``checkpointing.load_model`` reads it at TP = 1. A checkpoint is written into
a hidden ``.tmp-iter_XXXXXXX`` folder and renamed into place, then ``latest`` is replaced.
"""

from __future__ import annotations

import copy
import json
import logging
import math
import os
import shutil
from typing import Callable, Iterator

import torch

from megatron_qsparse.atomic import write_text
from megatron_qsparse.config import Config, ConfigError, ModelConfig, flag_of, padded_vocab_size
from megatron_qsparse.model.sharding import partition_specs
from megatron_qsparse.parallel.sharding import merge_shards, shard_tensor

logger = logging.getLogger(__name__)

TensorSource = Callable[[], Iterator[tuple[str, torch.Tensor]]]
MODEL_FILE = "mp_rank_{:02d}_model_states.pt"
MODEL_ARGS = "model_args.yaml"
# tensors whose first dimension is the (padded) vocabulary
VOCAB_TENSORS = ("embedding.weight", "output_layer.weight")


LAYER_FILE = "layer_{:02d}-model_{:02d}-model_states.pt"


def _check_layout(tp: int, pp: int, what: str) -> None:
    if tp < 1:
        raise ConfigError(f"--{what}tensor-parallel-size: got {tp}; use a positive integer")
    if pp < 1:
        raise ConfigError(f"--{what}pipeline-model-parallel-size: got {pp}; use a positive "
                          "integer")


def _save(obj, path: str) -> None:
    torch.save(obj, path + ".part")
    os.replace(path + ".part", path)


def vocab_divisor(vocab_size: int, tp: int, preferred: int = 128) -> int:
    """The largest power of two ``d <= preferred`` with ``vocab_size % (d * tp) == 0``, so that an
    imported vocabulary needs no padding rows (padding rows would add logits the original model
    does not have). When ``tp`` does not divide the vocabulary, ``preferred`` (padding happens)."""
    d = 1 << int(math.log2(max(1, preferred)))
    while d >= 1:
        if vocab_size % (d * tp) == 0:
            return d
        d //= 2
    logger.warning("vocabulary %d is not divisible by the tensor-parallel size %d: it is padded "
                   "with zero rows (their logits are 0, not absent)", vocab_size, tp)
    return preferred


def repad_vocab(source: TensorSource, vocab_size: int, new_rows: int) -> TensorSource:
    """``source`` with the vocabulary tensors cut to ``vocab_size`` rows and zero-padded to
    ``new_rows`` (unchanged when they already have ``new_rows``)."""

    def gen():
        for name, t in source():
            if name in VOCAB_TENSORS and t.shape[0] != new_rows:
                t = t[:vocab_size]
                if new_rows > vocab_size:
                    t = torch.cat([t, t.new_zeros(new_rows - vocab_size, *t.shape[1:])])
            yield name, t
    return gen


def model_args_yaml(cfg: Config) -> str:
    """The model shape as a ``pretrain_qsparse.py --config`` file (flags without dashes)."""
    lines = ["# Model shape of this checkpoint: pass it to pretrain_qsparse.py with --config",
             "# (flags given on the command line override it)."]
    defaults = ModelConfig()
    for key, value in cfg.to_dict()["model"].items():
        if value is None:
            continue
        flag = flag_of("model", key)[2:]
        if isinstance(value, bool):
            if getattr(defaults, key) is True:  # a switch that turns it off: --no-...
                value = not value
            value = "true" if value else "false"
        lines.append(f"{flag}: {value}")
    return "\n".join(lines) + "\n"


def write_checkpoint(save_dir: str, cfg: Config, source: TensorSource, *, iteration: int = 0,
                     extra_meta: dict | None = None) -> str:
    """Write ``source`` as a complete checkpoint of ``cfg``'s layout under ``save_dir``.

    ``cfg`` holds the model shape and the layout (``cfg.parallel``); ``cfg.model.vocab_size`` is
    the unpadded vocabulary and the vocabulary tensors must already have the padded size of
    ``cfg``. Returns the checkpoint folder. Every name of the model must come exactly once.
    """
    import deepspeed

    from megatron_qsparse.training.checkpointing import LATEST, META_NAME, TMP_PREFIX, tag_for

    from megatron_qsparse.model.pipeline import pipeline_layer_names

    tp, pp = cfg.parallel.tensor_model_parallel_size, cfg.parallel.pipeline_model_parallel_size
    _check_layout(tp, pp, "target-")
    layers = pipeline_layer_names(cfg.model)

    def engine_state(mp_world: int) -> dict:
        return {"dp_world_size": 1, "mp_world_size": mp_world, "global_steps": iteration,
                "global_samples": 0, "skipped_steps": 0, "iteration": iteration,
                "consumed_samples": 0, "ds_version": deepspeed.__version__}

    padded = padded_vocab_size(cfg.model.vocab_size, cfg)
    specs = partition_specs(cfg.model, padded, tp)
    tag = tag_for(iteration)
    os.makedirs(save_dir, exist_ok=True)
    tmp = os.path.join(save_dir, TMP_PREFIX + tag)
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    try:
        for rank in range(tp):
            module = {}
            for name, full in source():
                if name not in specs:
                    raise ConfigError(f"tensor {name!r} does not belong to the model described "
                                      "by the configuration; check the model shape")
                if name in module:
                    raise ConfigError(f"tensor {name!r} appears twice in the source")
                spec = specs[name]
                # clone: a slice would keep (and save) the whole full tensor's storage
                shard = full if spec is None else shard_tensor(full, spec[0], spec[1], rank, tp)
                module[name] = shard.detach().clone()
                del full, shard
            missing = sorted(set(specs) - set(module))
            if missing:
                raise ConfigError(f"the source has no tensor for {missing[:3]} "
                                  f"({len(missing)} missing); the model shape does not match")
            if pp == 1:
                _save({"module": module, **engine_state(tp)},
                      os.path.join(tmp, MODEL_FILE.format(rank)))
            else:  # DeepSpeed's pipeline files: one per layer of the sequence
                for idx, prefix in layers.items():
                    part = {k[len(prefix):]: module.pop(k) for k in list(module)
                            if k.startswith(prefix)}
                    _save(part, os.path.join(tmp, LAYER_FILE.format(idx, rank)))
                assert not module, f"tensors outside the layer sequence: {sorted(module)[:3]}"
            del module
            logger.info("wrote tensor-parallel rank %d/%d", rank + 1, tp)
        if pp > 1:  # the engine's own file of every model-parallel rank (weights: layer files)
            for mp in range(tp * pp):
                _save({"module": None, **engine_state(tp * pp)},
                      os.path.join(tmp, MODEL_FILE.format(mp)))
        meta = {"iteration": iteration, "consumed_samples": 0,
                "tensor_model_parallel_size": tp,
                "pipeline_model_parallel_size": cfg.parallel.pipeline_model_parallel_size,
                "data_parallel_size": 1, "zero_stage": 0, "config": cfg.to_dict(),
                **(extra_meta or {})}
        write_text(os.path.join(tmp, "qsparse_meta.json"), json.dumps(meta, indent=1,
                                                                      sort_keys=True))
        assert META_NAME == "qsparse_meta.json"
        final = os.path.join(save_dir, tag)
        if os.path.exists(final):
            shutil.rmtree(final)
        os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    write_text(os.path.join(save_dir, LATEST), tag)
    write_text(os.path.join(save_dir, MODEL_ARGS), model_args_yaml(cfg))
    return final


def read_checkpoint(path: str) -> tuple[Config, dict, TensorSource]:
    """``(config, meta, source)`` of a checkpoint (a save directory or one ``iter_*`` folder).

    The source yields full (TP = 1) tensors in :class:`GPTModel` naming, whatever the TP x PP
    split (MoE expert files included); each file is memory-mapped, so reading holds about one full
    tensor in memory beyond the page cache. The one reader of our checkpoints outside training
    (conversion, ``checkpointing.load_model``, evaluation).
    """
    from megatron_qsparse.training.checkpointing import (META_NAME, _deepspeed_safe_globals,
                                                         resolve_checkpoint)

    folder = resolve_checkpoint(path)
    with open(os.path.join(folder, META_NAME)) as fh:
        meta = json.load(fh)
    cfg = Config.from_dict(meta["config"])
    tp = int(meta.get("tensor_model_parallel_size", cfg.parallel.tensor_model_parallel_size))
    _check_layout(tp, int(meta.get("pipeline_model_parallel_size", 1)), "")
    if int(meta.get("zero_stage", 0)) >= 3:
        raise ConfigError(f"--load: {folder} was saved under ZeRO-3, whose weights live in the "
                          "optimizer partitions; save with --zero-stage 0-2 to convert it")
    pp = int(meta.get("pipeline_model_parallel_size", 1))
    from megatron_qsparse.model.pipeline import pipeline_layer_names

    # (prefix, files of the TP ranks, tensors under "module"): the whole model in one group, or
    # one group per layer; MoE adds one file per expert (DeepSpeed keeps the experts out of the
    # module state, keyed by global expert index whatever the expert-parallel size)
    if pp == 1:
        groups = [("", [os.path.join(folder, MODEL_FILE.format(r)) for r in range(tp)], True)]
        groups += [("", [os.path.join(folder, name)], False) for name in sorted(os.listdir(folder))
                   if name.startswith("layer_") and "_expert_" in name
                   and name.endswith("_model_states.pt")]
    else:
        groups = [(prefix, [os.path.join(folder, LAYER_FILE.format(idx, r)) for r in range(tp)],
                   False) for idx, prefix in pipeline_layer_names(cfg.model).items()]
    for _, files, _ in groups:
        for f in files:
            if not os.path.isfile(f):
                raise ConfigError(f"--load: {f} is missing; the checkpoint is incomplete")
    cfg.parallel.tensor_model_parallel_size = tp
    cfg.parallel.pipeline_model_parallel_size = pp
    padded = padded_vocab_size(cfg.model.vocab_size, cfg)
    model_cfg = copy.deepcopy(cfg.model)

    def load(f: str, in_module: bool) -> dict:
        with torch.serialization.safe_globals(_deepspeed_safe_globals()):
            try:
                state = torch.load(f, map_location="cpu", weights_only=True, mmap=True)
            except Exception as e:  # noqa: BLE001 - one actionable line
                raise ConfigError(f"--load: cannot read {f} safely "
                                  f"({str(e).strip().splitlines()[0]})") from None
        return state["module"] if in_module else state

    def source():
        specs = partition_specs(model_cfg, padded, tp) if tp > 1 else {}  # nothing to merge
        for prefix, files, in_module in groups:  # one layer (or the whole model) at a time
            states = [load(f, in_module) for f in files]
            for name in list(states[0]):
                spec = specs.get(prefix + name)
                parts = [s.pop(name) for s in states]
                yield prefix + name, parts[0] if spec is None else merge_shards(parts, *spec)
                del parts
    return cfg, meta, source


__all__ = ["TensorSource", "read_checkpoint", "write_checkpoint", "vocab_divisor",
           "repad_vocab", "model_args_yaml", "MODEL_ARGS"]
