"""Everything before the first step: processes, seeds, tokenizer, data, model, DeepSpeed engine."""

from __future__ import annotations

import json
import logging
import math
import os
import random
import socket
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import numpy as np
import torch

from megatron_qsparse.config import (Config, ConfigError, data_parallel_size,
                                     grad_accumulation_steps, padded_vocab_size, validate)
from megatron_qsparse.parallel.state import initialize_model_parallel

logger = logging.getLogger(__name__)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_distributed(cfg: Config) -> None:
    """Join (or, without a launcher, create) the process group through DeepSpeed.

    Under ``deepspeed``/``torchrun`` the launcher sets RANK, WORLD_SIZE and MASTER_*; a plain
    ``python pretrain_qsparse.py`` becomes a one-process group. CPU runs use gloo, GPU runs NCCL.
    """
    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    import deepspeed

    if "RANK" not in os.environ:
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(_free_port()))
    backend = cfg.parallel.distributed_backend
    if backend == "auto":
        backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl" and not torch.cuda.is_available():
        raise ConfigError("--distributed-backend: nccl needs GPUs and none is visible; use gloo")
    if not torch.distributed.is_initialized():
        deepspeed.init_distributed(
            dist_backend=backend, auto_mpi_discovery=False, verbose=False,
            timeout=timedelta(minutes=cfg.parallel.distributed_timeout_minutes))
        _unlink_deepspeed_shm()
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))


def _unlink_deepspeed_shm() -> None:
    """Remove this rank's name of DeepSpeed's CPU shared-memory all-reduce buffer.

    On CPU, when all ranks are local (the launcher sets ``LOCAL_SIZE``), ``deepspeed.comm``
    creates ``/dev/shm/deepspeed_allreduce_buffer_<uid>_<addr>_<port>_<rank>`` (69 MB) per rank,
    maps every rank's buffer, and never unlinks them: each launch left ~70 MB x ranks in
    ``/dev/shm`` (RAM) behind, 19 GB after a day of test runs. Once every rank has mapped the
    others' buffers (they do so inside ``init_distributed``, before this barrier) the names can
    go: the mappings stay valid and the memory is freed when the last process exits.
    """
    path = (f"/dev/shm/deepspeed_allreduce_buffer_{os.getuid()}_"
            f"{os.environ.get('MASTER_ADDR', '')}_{os.environ.get('MASTER_PORT', '')}_"
            f"{torch.distributed.get_rank()}")
    if not os.path.exists(path):
        return
    torch.distributed.barrier()
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


def set_seed(seed: int) -> None:
    """Seed python, numpy and torch (CPU and CUDA) identically on every rank."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def device() -> torch.device:
    if torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """AdamW groups: weight decay on matrices only, never on norms and biases."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (decay if p.ndim >= 2 else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay, "name": "decay"}]
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0, "name": "no_decay"})
    if any(getattr(p, "allreduce", True) is False for p in model.parameters()):
        # MoE: expert parameters go to their own groups, so that DeepSpeed reduces (and ZeRO
        # partitions) them over the expert-data-parallel group, not the data-parallel one
        from deepspeed.moe.utils import split_params_into_different_moe_groups_for_optimizer

        groups = split_params_into_different_moe_groups_for_optimizer(groups)
        groups = [g for g in groups if g["params"]]
    return groups


class GuardedAdamW(torch.optim.AdamW):
    """AdamW that skips (does not apply) a step whose gradients hold NaN or Inf.

    The decision is agreed over all ranks (each may hold only a ZeRO partition of the gradients).
    ``overflow`` tells DeepSpeed's engine that the step was skipped (it then counts it and holds the
    LR schedule); ``skipped_iters`` and ``consecutive_skips`` are kept here for logging and for
    stopping a run that keeps diverging.

    With ``parallel`` (ZeRO stage 0 in fp32, where the optimizer sees the model's own gradients)
    it also measures the gradient norm of the full model (:func:`~megatron_qsparse.parallel.utils.
    grad_norm`: TP shards, pipeline stages and tied weights each counted once) into ``grad_norm``
    and clips to ``clip_grad``. DeepSpeed's own clipping of that case counts the replicated
    parameters of pipeline stages other than the first as duplicates, so the engine's clipping is
    turned off then (:func:`deepspeed_config`). ``on_step(optimizer)``, when set, is called with
    the gradients before clipping and the update (for per-projection gradient norms).
    """

    def __init__(self, *args, clip_grad: float = 0.0, parallel=None, **kwargs):
        super().__init__(*args, **kwargs)
        self.overflow = False
        self.skipped_iters = 0
        self.consecutive_skips = 0
        self.clip_grad, self.parallel = clip_grad, parallel
        self.grad_norm: float | None = None
        self.on_step = None

    def _params(self) -> list:
        return [p for g in self.param_groups for p in g["params"]]

    def _grads_finite(self) -> bool:
        if self.parallel is not None:
            from megatron_qsparse.parallel.utils import grad_norm

            self.grad_norm = grad_norm(self._params(), self.parallel)
            bad = torch.tensor([0.0 if math.isfinite(self.grad_norm) else 1.0])
        else:
            grads = [p.grad for p in self._params() if p.grad is not None]
            bad = torch.zeros(1)
            if grads:
                norms = torch._foreach_norm(grads)
                bad = (~torch.isfinite(torch.stack(norms).float())).any().float().reshape(1).cpu()
        if torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1:
            torch.distributed.all_reduce(bad, op=torch.distributed.ReduceOp.MAX)
        return bad.item() == 0

    @torch.no_grad()
    def step(self, closure=None):  # noqa: D401 - torch signature
        if not self._grads_finite():
            self.overflow = True
            self.skipped_iters += 1
            self.consecutive_skips += 1
            for p in self._params():
                p.grad = None
            return None
        self.overflow = False
        self.consecutive_skips = 0
        if self.on_step is not None:  # before clipping: the norms the model produced
            self.on_step(self)
        if self.parallel is not None and self.clip_grad > 0:
            coef = self.clip_grad / (self.grad_norm + 1e-6)  # as torch's clip_grad_norm_
            if coef < 1.0:
                torch._foreach_mul_([p.grad for p in self._params() if p.grad is not None],
                                    coef)
        return super().step(closure)


class LRScheduler:
    """Megatron's optimizer-param scheduler: linear warm-up, then constant / linear / cosine decay
    to ``min_lr`` at ``decay_iters`` (``min_lr`` after), or WSD: warm-up, stable at ``lr``, then a
    final decay of ``lr_wsd_decay_iters`` (linear, cosine, exponential or 1-sqrt). Stepped once per
    applied optimizer step (a skipped step does not advance it); its state is checkpointed."""

    def __init__(self, optimizer: torch.optim.Optimizer, cfg: Config):
        t = cfg.train
        self.optimizer = optimizer
        self.max_lr, self.min_lr = t.lr, t.min_lr
        self.warmup_iters = t.lr_warmup_iters
        self.decay_iters = t.lr_decay_iters or t.train_iters
        self.style = t.lr_decay_style
        self.wsd_decay_iters = t.lr_wsd_decay_iters
        self.wsd_style = t.lr_wsd_decay_style
        self.num_steps = 0
        self._apply()

    def lr_at(self, step: int) -> float:
        if self.warmup_iters > 0 and step < self.warmup_iters:
            return self.max_lr * (step + 1) / self.warmup_iters
        if self.style == "constant":
            return self.max_lr
        if step >= self.decay_iters:
            return self.min_lr
        if self.style == "WSD":
            anneal_start = self.decay_iters - self.wsd_decay_iters
            if step <= anneal_start:
                coeff = 1.0
            else:
                r = (step - anneal_start) / self.wsd_decay_iters
                coeff = {"linear": 1.0 - r, "cosine": 0.5 * (math.cos(math.pi * r) + 1.0),
                         "exponential": 2.0 * 0.5 ** r - 1.0,
                         "minus_sqrt": 1.0 - math.sqrt(r)}[self.wsd_style]
        else:
            frac = (step - self.warmup_iters) / max(1, self.decay_iters - self.warmup_iters)
            if self.style == "linear":
                coeff = 1.0 - frac
            else:  # cosine
                coeff = 0.5 * (math.cos(math.pi * frac) + 1.0)
        return self.min_lr + coeff * (self.max_lr - self.min_lr)

    def _apply(self) -> None:
        lr = self.lr_at(self.num_steps)
        for g in self.optimizer.param_groups:
            g["lr"] = lr

    def get_lr(self) -> list[float]:
        return [g["lr"] for g in self.optimizer.param_groups]

    def get_last_lr(self) -> list[float]:
        return self.get_lr()

    def step(self, *args: Any, **kwargs: Any) -> None:
        if getattr(self.optimizer, "overflow", False):
            return  # the update was skipped; the schedule holds
        self.num_steps += 1
        self._apply()

    def state_dict(self) -> dict:
        return {"num_steps": self.num_steps}

    def load_state_dict(self, state: dict) -> None:
        self.num_steps = int(state["num_steps"])
        self._apply()


def optimizer_clips(cfg: Config) -> bool:
    """True when :class:`GuardedAdamW` measures and clips the gradient norm itself (ZeRO stage 0
    in fp32: DeepSpeed neither reports the norm there nor counts pipeline stages right)."""
    return cfg.parallel.zero_stage == 0 and not cfg.train.bf16


def deepspeed_config(cfg: Config, world_size: int, local_parameters: int | None = None) -> dict:
    """The DeepSpeed JSON built from our flags, merged over ``--deepspeed-config`` if given.

    Our flags win where both speak; each conflict is logged so nothing changes silently.
    ``local_parameters`` (this rank's parameter count) caps ZeRO's communication buckets where
    the file does not set them: DeepSpeed allocates its 5e8-element default up front (2-4 GB in
    fp32), pointless for a model smaller than that.
    """
    t = cfg.train
    ours: dict = {
        "train_micro_batch_size_per_gpu": t.micro_batch_size,
        "gradient_accumulation_steps": grad_accumulation_steps(cfg, world_size),
        # fp32 ZeRO-0: our optimizer clips (see GuardedAdamW); otherwise DeepSpeed's ZeRO / bf16
        # optimizer does
        "gradient_clipping": 0.0 if optimizer_clips(cfg) else t.clip_grad,
        "zero_optimization": {"stage": cfg.parallel.zero_stage},
        "bf16": {"enabled": t.bf16},
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 2**31 - 1,
        "wall_clock_breakdown": False,
    }
    if not cfg.parallel.deepspeed_config:
        return _cap_buckets(ours, local_parameters)
    with open(cfg.parallel.deepspeed_config) as fh:
        try:
            theirs = json.load(fh)
        except json.JSONDecodeError as e:
            raise ConfigError(f"--deepspeed-config: {cfg.parallel.deepspeed_config} is not valid "
                              f"JSON ({e}); fix the file") from None
    theirs.pop("train_batch_size", None)  # derived from micro-batch x accumulation x DP
    merged = dict(theirs)
    for key, value in ours.items():
        if isinstance(value, dict) and isinstance(theirs.get(key), dict):
            sub = dict(theirs[key])
            for k, v in value.items():
                if k in sub and sub[k] != v:
                    logger.warning("DeepSpeed config %s.%s=%r replaced by our flag value %r",
                                   key, k, sub[k], v)
                sub[k] = v
            merged[key] = sub
        else:
            if key in theirs and theirs[key] != value:
                logger.warning("DeepSpeed config %s=%r replaced by our flag value %r",
                               key, theirs[key], value)
            merged[key] = value
    if "optimizer" in merged or "scheduler" in merged:
        raise ConfigError("--deepspeed-config: remove its 'optimizer'/'scheduler' sections; "
                          "set them with --lr, --weight-decay, --lr-decay-style, ... instead")
    return _cap_buckets(merged, local_parameters)


_DS_BUCKET = 500_000_000  # DeepSpeed's default reduce/all-gather bucket (elements)


def _cap_buckets(ds: dict, local_parameters: int | None) -> dict:
    if local_parameters is None or ds["zero_optimization"]["stage"] == 0:
        return ds
    zero = ds["zero_optimization"]
    bucket = int(min(_DS_BUCKET, max(local_parameters, 1_000_000)))
    for key in ("reduce_bucket_size", "allgather_bucket_size"):
        zero.setdefault(key, bucket)
    return ds


@dataclass
class TrainingState:
    """What the loop needs, built by :func:`setup`."""

    cfg: Config
    engine: Any
    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: LRScheduler
    tokenizer: Any
    train_ds: Any
    valid_ds: Any
    test_ds: Any
    world_size: int
    rank: int
    dp_size: int
    dp_rank: int
    iteration: int = 0
    consumed_samples: int = 0
    parallel: Any = None  # the ParallelState (groups of TP/PP/DP); None = single process


def build_model(cfg: Config, vocab_size: int, parallel=None) -> torch.nn.Module:
    """The GPT model; under tensor parallelism this rank's shards (``parallel``: the
    :class:`~megatron_qsparse.parallel.state.ParallelState`, default the current one), under
    pipeline parallelism this rank's stage (a ``deepspeed.pipe.PipelineModule``). Layer ``i`` is
    initialised from ``--seed + i`` whatever the layout, so every layout starts from the same
    weights."""
    from megatron_qsparse.model.gpt import GPTModel, build_pipeline_model
    from megatron_qsparse.parallel.state import get_parallel_state

    parallel = parallel if parallel is not None else get_parallel_state()
    if parallel.pp_size > 1:
        return build_pipeline_model(cfg.model, cfg.qsparse, vocab_size, parallel,
                                    init_seed=cfg.train.seed,
                                    partition_method=cfg.parallel.pipeline_partition_method)
    return GPTModel(cfg.model, cfg.qsparse, vocab_size, parallel=parallel,
                    init_seed=cfg.train.seed,
                    expert_parallel_size=cfg.parallel.expert_model_parallel_size)


def setup(cfg: Config) -> TrainingState:
    """Initialise processes, data, model and the DeepSpeed engine for ``cfg``."""
    import deepspeed

    from megatron_qsparse.data.gpt_dataset import build_train_valid_test_datasets
    from megatron_qsparse.data.tokenizer import build_tokenizer
    from megatron_qsparse.data.validation import validate_data

    init_distributed(cfg)
    world_size = torch.distributed.get_world_size()
    rank = torch.distributed.get_rank()
    validate_data(validate(cfg, world_size=world_size).data)
    if cfg.train.deterministic:
        torch.use_deterministic_algorithms(True)
    # TP/PP/DP groups from one topology; data-parallel rank and size come from it (all TP ranks
    # of one data-parallel rank read the same micro-batches).
    parallel = initialize_model_parallel(cfg.parallel.tensor_model_parallel_size,
                                         cfg.parallel.pipeline_model_parallel_size)
    dp_size, dp_rank = parallel.dp_size, parallel.dp_rank
    assert dp_size == data_parallel_size(cfg, world_size)

    tokenizer = build_tokenizer(cfg.data.tokenizer_type, cfg.data.tokenizer_model)
    if cfg.model.vocab_size is None:
        cfg.model.vocab_size = tokenizer.vocab_size
    elif cfg.model.vocab_size < tokenizer.vocab_size:
        raise ConfigError(f"--vocab-size: {cfg.model.vocab_size} is smaller than the tokenizer's "
                          f"{tokenizer.vocab_size}; leave it unset")
    vocab = padded_vocab_size(cfg.model.vocab_size, cfg)

    gbs = cfg.train.global_batch_size or cfg.train.micro_batch_size * dp_size
    evals = cfg.train.train_iters // cfg.train.eval_interval + 1
    num_samples = (cfg.train.train_iters * gbs,
                   evals * cfg.train.eval_iters * gbs if cfg.train.eval_iters else 0,
                   cfg.train.eval_iters * gbs if cfg.train.test else 0)
    # Rank 0 builds (and caches) the sample indices first; the others then read the cache.
    if rank != 0:
        torch.distributed.barrier()
    try:
        if cfg.data.data_format == "sft":
            from megatron_qsparse.data.sft_dataset import build_sft_datasets

            pad = tokenizer.pad if tokenizer.pad is not None and tokenizer.pad >= 0 \
                else tokenizer.eod
            train_ds, valid_ds, test_ds = build_sft_datasets(
                list(cfg.data.data_path), cfg.data.split, cfg.model.seq_length, cfg.train.seed,
                num_samples, pad, cache_dir=cfg.data.data_cache_path)
        else:
            train_ds, valid_ds, test_ds = build_train_valid_test_datasets(
                list(cfg.data.data_path), cfg.data.split, cfg.model.seq_length, cfg.train.seed,
                num_samples, cache_dir=cfg.data.data_cache_path)
    except (ValueError, FileNotFoundError) as e:
        raise ConfigError(f"--data-path: {e}") from None
    finally:
        if rank == 0:
            torch.distributed.barrier()
    if cfg.train.test and test_ds is None:
        raise ConfigError(f"--test: the split {cfg.data.split!r} leaves no test documents; give "
                          "the third number of --split a positive share")
    if train_ds is None:
        raise ConfigError(f"--split: {cfg.data.split!r} leaves no training documents; "
                          "give the train split a positive share")

    set_seed(cfg.train.seed)  # the same on every rank: TP shards are cut from identical draws
    model = build_model(cfg, vocab, parallel).to(device())
    optimizer = GuardedAdamW(
        param_groups(model, cfg.train.weight_decay), lr=cfg.train.lr,
        betas=(cfg.train.adam_beta1, cfg.train.adam_beta2), eps=cfg.train.adam_eps,
        clip_grad=cfg.train.clip_grad, parallel=parallel if optimizer_clips(cfg) else None)
    scheduler = LRScheduler(optimizer, cfg)
    # the pipeline engine takes its groups from the module's topology (DeepSpeed refuses an mpu)
    engine, _, _, _ = deepspeed.initialize(
        model=model, optimizer=optimizer, lr_scheduler=scheduler,
        config=deepspeed_config(cfg, world_size, sum(p.numel() for p in model.parameters())),
        mpu=parallel.mpu() if parallel.pp_size == 1 else None)
    # Seed the dropout/data RNG per data-parallel rank after init (init must match everywhere);
    # TP ranks share it (replicated activations drop the same elements) and get their own
    # model-parallel RNG for dropout on their attention heads.
    set_seed(cfg.train.seed + 100 * dp_rank)
    parallel.seed(cfg.train.seed + 100 * dp_rank)
    return TrainingState(cfg=cfg, engine=engine, model=model, optimizer=optimizer,
                         scheduler=scheduler, tokenizer=tokenizer, train_ds=train_ds,
                         valid_ds=valid_ds, test_ds=test_ds, world_size=world_size, rank=rank,
                         dp_size=dp_size, dp_rank=dp_rank, parallel=parallel)
