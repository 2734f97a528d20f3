"""A stream of full (TP = 1) tensors -> our checkpoint folders for one parallel layout.

This is the seam between the *model* and its *layout* in checkpoint conversion (the writing
side; reading is :mod:`megatron_qsparse.checkpoint.reader`):

* a **tensor source** is a zero-argument callable returning an iterator of ``(name, tensor)``
  pairs, in our parameter naming (``embedding.weight``, ``layers.0.attention.qkv.weight``, ...),
  each tensor the full (unsharded) parameter. It can be iterated several times and yields one
  tensor at a time (a Hugging Face directory read lazily, or an existing checkpoint memory-mapped);
* :func:`write_checkpoint` cuts such a stream into the files of a layout: one
  ``mp_rank_XX_model_states.pt`` per TP rank, or under pipeline parallelism DeepSpeed's per-layer
  files ``layer_II-model_RR-model_states.pt`` (layer ``II`` of the layer sequence, TP rank ``RR``;
  the same files whatever the stage count) plus one ``mp_rank_XX`` file per model-parallel rank;
* :func:`~megatron_qsparse.checkpoint.reader.read_checkpoint` turns a checkpoint folder of any
  supported layout back into a source.

Peak memory of a write is about one TP rank's shard plus one full tensor: the ranks are written one
after the other, each from a fresh pass over the source (a source is re-read ``tp`` times rather
than held in memory).

The files are what :mod:`megatron_qsparse.training.checkpointing` writes, so
``pretrain_qsparse.py --load DIR --finetune`` (weights only) starts from a converted checkpoint at
the same TP size, and :func:`~megatron_qsparse.checkpoint.reader.load_model` reads it at TP = 1.
A checkpoint is written into a hidden ``.tmp-iter_XXXXXXX`` folder and renamed into place, then
``latest`` is replaced.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil

import torch

from megatron_qsparse.atomic import write_text
from megatron_qsparse.checkpoint.layout import (LATEST, LAYER_FILE, META_NAME, MODEL_FILE,
                                                TMP_PREFIX, check_layout, tag_for)
from megatron_qsparse.checkpoint.reader import TensorSource
from megatron_qsparse.config import Config, ConfigError, ModelConfig, flag_of, padded_vocab_size
from megatron_qsparse.model.pipeline import pipeline_layer_names
from megatron_qsparse.model.sharding import partition_specs
from megatron_qsparse.parallel.sharding import shard_tensor

logger = logging.getLogger(__name__)

MODEL_ARGS = "model_args.yaml"
# tensors whose first dimension is the (padded) vocabulary
VOCAB_TENSORS = ("embedding.weight", "output_layer.weight")


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

    tp, pp = cfg.parallel.tensor_model_parallel_size, cfg.parallel.pipeline_model_parallel_size
    check_layout(tp, pp, "target-")
    layers = pipeline_layer_names(cfg.model)

    def engine_state(mp_world: int) -> dict:
        return {"dp_world_size": 1, "mp_world_size": mp_world, "global_steps": iteration,
                "global_samples": 0, "skipped_steps": 0, "iteration": iteration,
                "consumed_samples": 0, "ds_version": deepspeed.__version__}

    padded = padded_vocab_size(cfg.model.vocab_size, cfg)
    specs = partition_specs(cfg.model, padded, tp)
    tag = tag_for(iteration)
    created = not os.path.exists(save_dir)
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
        write_text(os.path.join(tmp, META_NAME), json.dumps(meta, indent=1, sort_keys=True))
        final = os.path.join(save_dir, tag)
        if os.path.exists(final):
            shutil.rmtree(final)
        os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        if created:  # leave no empty --save folder behind
            try:
                os.rmdir(save_dir)
            except OSError:
                pass
        raise
    write_text(os.path.join(save_dir, LATEST), tag)
    write_text(os.path.join(save_dir, MODEL_ARGS), model_args_yaml(cfg))
    return final


__all__ = ["TensorSource", "write_checkpoint", "vocab_divisor", "repad_vocab", "model_args_yaml",
           "MODEL_ARGS"]
