"""Reading our checkpoints outside training: one stream of full (TP = 1) tensors, the model.

:func:`read_checkpoint` turns a checkpoint of any supported layout (TP x PP split, MoE expert
files) into a **tensor source**: a zero-argument callable returning an iterator of
``(name, tensor)`` pairs in :class:`~megatron_qsparse.model.gpt.GPTModel` naming
(``embedding.weight``, ``layers.0.attention.qkv.weight``, ...), each the full (unsharded)
parameter. It is the one reader of our checkpoints outside training (conversion, evaluation,
generation, reports): :func:`read_model_state` collects it into a state dict and
:func:`load_model` builds the trained model from it.

Every file is memory-mapped (``torch.load(mmap=True)``) and merged one tensor at a time, so
reading holds about one full tensor in memory beyond the page cache. Loading is safe: JSON
metadata and ``torch.load(weights_only=True)`` with :func:`~megatron_qsparse.checkpoint.safe.
deepspeed_safe_globals` only.
"""

from __future__ import annotations

import copy
import os
from typing import Callable, Iterator

import torch

from megatron_qsparse.checkpoint.layout import LAYER_FILE, MODEL_FILE, check_layout, read_meta
from megatron_qsparse.checkpoint.safe import deepspeed_safe_globals
from megatron_qsparse.config import Config, ConfigError, padded_vocab_size
from megatron_qsparse.model.gpt import GPTModel
from megatron_qsparse.model.pipeline import pipeline_layer_names
from megatron_qsparse.model.sharding import partition_specs
from megatron_qsparse.parallel.sharding import merge_shards

TensorSource = Callable[[], Iterator[tuple[str, torch.Tensor]]]


def read_checkpoint(path: str) -> tuple[Config, dict, TensorSource]:
    """``(config, meta, source)`` of a checkpoint (a save directory or one ``iter_*`` folder).

    The source yields full (TP = 1) tensors in :class:`~megatron_qsparse.model.gpt.GPTModel`
    naming, whatever the TP x PP split (MoE expert files included); each file is memory-mapped, so
    reading holds about one full tensor in memory beyond the page cache.
    """
    folder, meta = read_meta(path)
    cfg = Config.from_dict(meta["config"])
    tp = int(meta.get("tensor_model_parallel_size", cfg.parallel.tensor_model_parallel_size))
    check_layout(tp, int(meta.get("pipeline_model_parallel_size", 1)), "")
    if int(meta.get("zero_stage", 0)) >= 3:
        raise ConfigError(f"--load: {folder} was saved under ZeRO-3, whose weights live in the "
                          "optimizer partitions; save with --zero-stage 0-2 to convert it")
    pp = int(meta.get("pipeline_model_parallel_size", 1))

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
        with torch.serialization.safe_globals(deepspeed_safe_globals()):
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


def read_model_state(folder: str, map_location: str = "cpu") -> dict:
    """The full model's state dict (:class:`~megatron_qsparse.model.gpt.GPTModel` names) of a
    checkpoint folder, whatever its tensor/pipeline split and MoE expert files
    (:func:`read_checkpoint`)."""
    state = dict(read_checkpoint(folder)[2]())
    if map_location != "cpu":
        state = {k: v.to(map_location) for k, v in state.items()}
    return state


def load_model(path: str, map_location: str = "cpu"):
    """Build the model a checkpoint was trained with and load its weights (one process: the
    checkpoint must have tensor-parallel size 1; any pipeline split is merged).

    Returns ``(model, config)``; the model is in eval mode. Reads only JSON and tensors.
    """
    folder, meta = read_meta(path)
    cfg = Config.from_dict(meta["config"])
    if cfg.parallel.tensor_model_parallel_size != 1:
        raise ConfigError(f"--load: {folder} is split for tensor parallelism "
                          f"({cfg.parallel.tensor_model_parallel_size} ranks); merge it to one "
                          "shard first")
    state = read_model_state(folder, map_location)
    model = GPTModel(cfg.model, padded_vocab_size(cfg.model.vocab_size, cfg))
    try:
        model.load_state_dict(state)
    except RuntimeError as e:
        raise ConfigError(f"--load: the weights in {folder} do not fit the model its config "
                          f"describes: {str(e).strip().splitlines()[0]}") from None
    model.eval()
    return model, cfg


__all__ = ["TensorSource", "load_model", "read_checkpoint", "read_model_state"]
