"""A checkpoint's model and tokenizer for evaluation, at its trained sparsity or an override.

Tensor-parallel checkpoints (one ``mp_rank_XX_model_states.pt`` per TP rank) are read in either of
two ways:

- one process (``parallel`` None or TP = 1): the shards are merged into the full TP = 1 weights in
  memory (:func:`~megatron_qsparse.model.sharding.gather_state_dicts`). Our TP top-K is the
  unsplit row's top-K element for element, so the merged model computes what the TP model does;
- under a launcher with TP = the checkpoint's TP (``parallel`` from
  :func:`~megatron_qsparse.parallel.state.initialize_model_parallel`): every rank loads only its
  own shard and the parallel layers run as in training.

Loading is safe: JSON metadata and ``torch.load(weights_only=True)`` (checkpoints are found and
read through :mod:`megatron_qsparse.checkpoint`).
"""

from __future__ import annotations

import copy
import logging
import os
from dataclasses import dataclass
from typing import Any

import torch

from megatron_qsparse.checkpoint import (MODEL_FILE, deepspeed_safe_globals, read_meta,
                                         read_model_state)
from megatron_qsparse.config import (PROJECTION_KINDS, Config, ConfigError, DataConfig,
                                     validate)
from megatron_qsparse.model.gpt import GPTModel
from megatron_qsparse.model.sharding import gather_state_dicts
from megatron_qsparse.parallel.state import ParallelState
from megatron_qsparse.sparsity.methods import get_method

logger = logging.getLogger(__name__)


@dataclass
class EvalModel:
    """A loaded checkpoint: the model (eval mode), its config and where it came from."""

    model: torch.nn.Module
    cfg: Config
    folder: str
    checkpoint_tp: int
    parallel: Any = None

    @property
    def max_length(self) -> int:
        """Longest input the model takes (its rotary tables' length)."""
        m = self.cfg.model
        return int(m.max_position_embeddings or m.seq_length)

    @property
    def vocab_size(self) -> int:
        """The tokenizer's vocabulary (before padding)."""
        return int(self.cfg.model.vocab_size or self.model.vocab_size)


def _load_shard(folder: str, tp_rank: int) -> dict:
    path = os.path.join(folder, MODEL_FILE.format(tp_rank))
    if not os.path.isfile(path):
        raise ConfigError(f"--load: {path} is missing; the checkpoint is incomplete")
    with torch.serialization.safe_globals(deepspeed_safe_globals()):
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:  # noqa: BLE001 - one actionable line
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise ConfigError(f"--load: cannot read {path} safely ({first})") from None
    if not isinstance(state, dict) or "module" not in state:
        raise ConfigError(f"--load: {path} holds no model state ('module'); not a "
                          "megatron-qsparse checkpoint")
    return state["module"]


def apply_sparsity_override(cfg: Config, mode: str | None = None,
                            ratio: float | None = None) -> Config:
    """A copy of ``cfg`` whose sparsifier is ``mode`` and/or whose ratio S is ``ratio`` for every
    projection (per-projection ratios of the checkpoint are dropped when either is given).

    Raises :class:`ConfigError` for an impossible setting.
    """
    cfg = copy.deepcopy(cfg)
    if mode is None and ratio is None:
        return cfg
    q = cfg.qsparse
    if mode is not None:
        try:
            get_method(mode)
        except ValueError as e:
            raise ConfigError(str(e)) from None
        q.mode = mode
    if ratio is not None:
        q.ratio = float(ratio)
    for kind in PROJECTION_KINDS:
        setattr(q, f"{kind}_ratio", None)
    q.warmup_iters = 0
    if not get_method(q.mode).rescalable:
        q.rescale = "none"  # rescaling belongs to the methods that take it (top-K)
    # check the model and sparsity settings only (the data/training sections are not used here)
    validate(Config(model=copy.deepcopy(cfg.model), qsparse=copy.deepcopy(q),
                    data=DataConfig(data_path=["unused"], tokenizer_type="ByteTokenizer")))
    return cfg


def load_for_eval(path: str, *, qsparse_mode: str | None = None,
                  qsparse_ratio: float | None = None, parallel=None,
                  device: str | torch.device = "cpu",
                  dtype: torch.dtype | None = None) -> EvalModel:
    """Build the model a checkpoint was trained with and load its weights for evaluation.

    ``path``: a save directory (its ``latest``) or one ``iter_*`` folder. ``qsparse_mode`` /
    ``qsparse_ratio`` override the trained sparsity (same weights). ``parallel``: a
    :class:`~megatron_qsparse.parallel.state.ParallelState` whose TP size equals the checkpoint's
    to load this rank's shard; None (or TP = 1) merges all shards into one process.
    """
    folder, meta = read_meta(path)
    cfg = Config.from_dict(meta["config"])
    ckpt_tp = int(meta.get("tensor_model_parallel_size",
                           cfg.parallel.tensor_model_parallel_size))
    ckpt_pp = int(meta.get("pipeline_model_parallel_size",
                           cfg.parallel.pipeline_model_parallel_size))
    if ckpt_pp != 1 and ckpt_tp != 1:
        raise ConfigError(f"--load: {folder} is split into {ckpt_tp} tensor-parallel shards x "
                          f"{ckpt_pp} pipeline stages; re-shard it to one stage first "
                          "(tools/checkpoint_convert.py reshard)")
    cfg = apply_sparsity_override(cfg, qsparse_mode, qsparse_ratio)
    run_tp = 1 if parallel is None else parallel.tp_size
    if run_tp == 1:
        if ckpt_tp == 1:  # any pipeline split and MoE expert files are merged
            state = read_model_state(folder)
        else:
            logger.info("merging the %d tensor-parallel shards of %s into one", ckpt_tp, folder)
            state = gather_state_dicts([_load_shard(folder, r) for r in range(ckpt_tp)],
                                       cfg.model)
        parallel = ParallelState.single() if parallel is None else parallel
    elif run_tp == ckpt_tp:
        state = _load_shard(folder, parallel.tp_rank)
    else:
        raise ConfigError(f"--load: {folder} holds {ckpt_tp} tensor-parallel shards but this run "
                          f"has tensor-parallel size {run_tp}; launch {ckpt_tp} processes or "
                          "run one process (the shards are merged)")
    vocab = state["embedding.weight"].shape[0] * run_tp  # the padded vocabulary
    with torch.device("meta"):
        model = GPTModel(cfg.model, vocab, parallel=parallel)
    missing = set(model.state_dict()) ^ set(state)
    if missing:
        raise ConfigError(f"--load: {folder} does not match the model of its own config "
                          f"(differing tensors: {', '.join(sorted(missing)[:4])}); it was saved "
                          "by another version")
    shapes = {k: v.shape for k, v in model.state_dict().items()}
    for k, t in state.items():
        if t.shape != shapes[k]:
            hint = ("; a ZeRO-3 checkpoint holds partitioned weights: consolidate them first "
                    "(DeepSpeed's zero_to_fp32.py)" if meta.get("zero_stage") == 3 else "")
            raise ConfigError(f"--load: {folder}: tensor {k} has shape {tuple(t.shape)}, the "
                              f"model of its config expects {tuple(shapes[k])}{hint}")
    model.load_state_dict(state, assign=True)
    model = model.to(device=device, dtype=dtype) if dtype is not None else model.to(device)
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return EvalModel(model=model, cfg=cfg, folder=folder, checkpoint_tp=ckpt_tp,
                     parallel=parallel)


def build_eval_tokenizer(cfg: Config, tokenizer_model: str | None = None):
    """The tokenizer the checkpoint was trained with (``tokenizer_model`` replaces the stored
    path, e.g. when the checkpoint moved to another machine)."""
    from megatron_qsparse.data.tokenizer import build_tokenizer

    path = tokenizer_model or cfg.data.tokenizer_model
    if cfg.data.tokenizer_type != "ByteTokenizer" and path and not os.path.isfile(path):
        raise ConfigError(f"--tokenizer-model: the checkpoint's tokenizer {path!r} is not found "
                          "here; pass the path of its SentencePiece .model file")
    try:
        tok = build_tokenizer(cfg.data.tokenizer_type, path)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    if cfg.model.vocab_size is not None and tok.vocab_size > cfg.model.vocab_size:
        raise ConfigError(f"--tokenizer-model: {tok.name} has {tok.vocab_size} tokens but the "
                          f"model was trained with {cfg.model.vocab_size}; use the checkpoint's "
                          "tokenizer")
    return tok
