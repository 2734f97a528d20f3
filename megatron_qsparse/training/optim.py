"""The optimizer and its schedule: AdamW parameter groups, :class:`GuardedAdamW` (skips
non-finite steps, measures and clips the gradient norm where DeepSpeed does not) and Megatron's
:class:`LRScheduler`; :func:`build_optimizer` makes the pair :func:`~megatron_qsparse.training.
setup.setup` hands to ``deepspeed.initialize``."""

from __future__ import annotations

import math
from typing import Any

import torch

from megatron_qsparse.config import Config


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
    turned off then (:func:`~megatron_qsparse.training.deepspeed_config.deepspeed_config`).
    ``on_step(optimizer)``, when set, is called with the gradients before clipping and the update
    (for per-projection gradient norms).
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



def build_optimizer(cfg: Config, model: torch.nn.Module,
                    parallel=None) -> tuple[GuardedAdamW, LRScheduler]:
    """The optimizer over ``model``'s parameter groups and its LR schedule, from ``cfg``
    (``parallel``: the topology, needed when the optimizer clips, see :func:`optimizer_clips`)."""
    t = cfg.train
    optimizer = GuardedAdamW(
        param_groups(model, t.weight_decay), lr=t.lr, betas=(t.adam_beta1, t.adam_beta2),
        eps=t.adam_eps, clip_grad=t.clip_grad,
        parallel=parallel if optimizer_clips(cfg) else None)
    return optimizer, LRScheduler(optimizer, cfg)
