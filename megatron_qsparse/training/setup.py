"""Everything before the first step: processes, seeds, tokenizer, data, model, DeepSpeed engine.

The optimizer and its schedule are built in :mod:`~megatron_qsparse.training.optim`, the DeepSpeed
JSON in :mod:`~megatron_qsparse.training.deepspeed_config`; :func:`setup` puts them together."""

from __future__ import annotations

import logging
import os
import random
import socket
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import numpy as np
import torch

from megatron_qsparse.config import (Config, ConfigError, data_parallel_size, flag_error,
                                     flag_of, padded_vocab_size, validate)
from megatron_qsparse.parallel.state import initialize_model_parallel
from megatron_qsparse.training.deepspeed_config import deepspeed_config
from megatron_qsparse.training.optim import LRScheduler, build_optimizer

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


@dataclass
class TrainingState:
    """What the :class:`~megatron_qsparse.training.trainer.Trainer` needs, built by
    :func:`setup`."""

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
    from megatron_qsparse.model.gpt import GPTModel
    from megatron_qsparse.model.pipeline import build_pipeline_model
    from megatron_qsparse.parallel.state import get_parallel_state

    parallel = parallel if parallel is not None else get_parallel_state()
    if parallel.pp_size > 1:
        return build_pipeline_model(cfg.model, vocab_size, parallel,
                                    init_seed=cfg.train.seed,
                                    partition_method=cfg.parallel.pipeline_partition_method,
                                    fields=cfg.data.document_fields())
    model = GPTModel(cfg.model, vocab_size, parallel=parallel, init_seed=cfg.train.seed,
                     expert_parallel_size=cfg.parallel.expert_model_parallel_size)
    if cfg.train.torch_compile:
        # ZeRO-3 gathers a partitioned parameter in the hooks of the module that owns it; the
        # head reads the (tied) embedding weight outside that module, which a compiled region
        # would capture partitioned: under ZeRO-3 the head stays eager
        compile_blocks(model, head=cfg.parallel.zero_stage < 3)
    return model


def compile_blocks(model: torch.nn.Module, head: bool = True) -> None:
    """``--torch-compile``: compile each transformer block in place (torchtitan's granularity:
    the blocks are identical, so one compilation serves all; parameter names are unchanged),
    and (``head``) the final norm, LM head and cross entropy as one more region.
    A block compiles as one graph on its own; under ZeRO-3 DeepSpeed's parameter hooks run
    inside it, so graph breaks are allowed there."""
    for block in model.layers:
        block.compile()
    if head:
        model.head = torch.compile(model.head)  # final norm + LM head + loss, one region too


def build_tokenizer_and_vocab(cfg: Config):
    """The tokenizer and the padded vocabulary size; fills ``--vocab-size`` from the tokenizer
    when unset."""
    from megatron_qsparse.data.tokenizer import build_tokenizer

    tokenizer = build_tokenizer(cfg.data.tokenizer_type, cfg.data.tokenizer_model)
    if cfg.model.vocab_size is None:
        cfg.model.vocab_size = tokenizer.vocab_size
    elif cfg.model.vocab_size < tokenizer.vocab_size:
        raise ConfigError(f"--vocab-size: {cfg.model.vocab_size} is smaller than the tokenizer's "
                          f"{tokenizer.vocab_size}; leave it unset")
    return tokenizer, padded_vocab_size(cfg.model.vocab_size, cfg)


def build_datasets(cfg: Config, tokenizer, dp_size: int, rank: int,
                   vocab: int | None = None) -> tuple:
    """The train / validation / test datasets (GPT or SFT), sized for the whole run; rank 0
    builds (and caches) the sample indices first, the other ranks then read the cache."""
    from megatron_qsparse.data.gpt_dataset import build_train_valid_test_datasets

    gbs = cfg.train.global_batch_size or cfg.train.micro_batch_size * dp_size
    evals = (cfg.train.train_iters // cfg.train.eval_interval + 1) if cfg.train.eval_interval \
        else 0
    num_samples = (cfg.train.train_iters * gbs,
                   evals * cfg.train.eval_iters * gbs if cfg.train.eval_iters else 0,
                   cfg.train.eval_iters * gbs if cfg.train.test else 0)
    if rank != 0:
        torch.distributed.barrier()
    try:
        if vocab is not None:  # ids the embedding has no row for: refused here, not mid-step
            from megatron_qsparse.data.validation import check_token_ids

            check_token_ids(cfg.data.data_path, vocab, cfg.data.data_cache_path)
        if cfg.data.data_format == "sft":
            from megatron_qsparse.data.sft_dataset import build_sft_datasets

            pad = tokenizer.pad if tokenizer.pad is not None and tokenizer.pad >= 0 \
                else tokenizer.eod
            train_ds, valid_ds, test_ds = build_sft_datasets(
                list(cfg.data.data_path), cfg.data.split, cfg.model.seq_length, cfg.train.seed,
                num_samples, pad, cache_dir=cfg.data.data_cache_path,
                packing=cfg.data.sft_packing)
        else:
            train_ds, valid_ds, test_ds = build_train_valid_test_datasets(
                list(cfg.data.data_path), cfg.data.split, cfg.model.seq_length, cfg.train.seed,
                num_samples, cache_dir=cfg.data.data_cache_path)
            train_ds, valid_ds, test_ds = (_with_document_resets(cfg, tokenizer, ds)
                                           for ds in (train_ds, valid_ds, test_ds))
    except ConfigError:
        raise
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
    return train_ds, valid_ds, test_ds


def end_of_document_id(tokenizer) -> int | None:
    """The tokenizer's end-of-document id, or None where it has none."""
    try:
        eod = tokenizer.eod
    except (TypeError, ValueError, AttributeError):  # e.g. a Hugging Face tokenizer without eos
        return None
    return None if eod is None or int(eod) < 0 else int(eod)


def _with_document_resets(cfg: Config, tokenizer, dataset):
    """``dataset`` with Megatron's ``--reset-position-ids``/``--reset-attention-mask``/
    ``--eod-mask-loss`` arrays added to its samples (unchanged without those flags)."""
    names = ("reset_position_ids", "reset_attention_mask", "eod_mask_loss")
    flags = tuple(getattr(cfg.data, n) for n in names)
    if dataset is None or not any(flags):
        return dataset
    from megatron_qsparse.data.documents import DocumentResetDataset

    on = [n for n, f in zip(names, flags) if f]
    eod = end_of_document_id(tokenizer)
    if eod is None:
        raise flag_error("data", on[0], f"the {cfg.data.tokenizer_type} tokenizer has no "
                         "end-of-document token to find document boundaries by",
                         "use a tokenizer with an eos/eod token or drop the flag")
    logger.info("%s: documents end at token %d (%s)", getattr(dataset, "name", "data"), eod,
                " ".join(flag_of("data", n) for n in on))
    return DocumentResetDataset(dataset, eod, *flags)


def setup(cfg: Config) -> TrainingState:
    """Initialise processes, data, model and the DeepSpeed engine for ``cfg``."""
    import deepspeed

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

    tokenizer, vocab = build_tokenizer_and_vocab(cfg)
    train_ds, valid_ds, test_ds = build_datasets(cfg, tokenizer, dp_size, rank, vocab)

    set_seed(cfg.train.seed)  # the same on every rank: TP shards are cut from identical draws
    model = build_model(cfg, vocab, parallel).to(device())
    optimizer, scheduler = build_optimizer(cfg, model, parallel)
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
