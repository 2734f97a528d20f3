"""The DeepSpeed JSON config: built from our flags, merged over ``--deepspeed-config``."""

from __future__ import annotations

import json
import logging

from megatron_qsparse.config import Config, ConfigError, grad_accumulation_steps
from megatron_qsparse.training.optim import optimizer_clips

logger = logging.getLogger(__name__)


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

