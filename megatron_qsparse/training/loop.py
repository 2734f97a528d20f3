"""Train and evaluation iterations over the DeepSpeed engine."""

from __future__ import annotations

import logging
import math
import time

import torch

from megatron_qsparse.config import grad_accumulation_steps
from megatron_qsparse.data.sampler import build_pretraining_data_loader
from megatron_qsparse.sparsity import (collect_density, recording, reset_density, set_recording,
                                      set_sparsity_scale)
from megatron_qsparse.training import checkpointing
from megatron_qsparse.training.logging import Writer, console_line
from megatron_qsparse.training.setup import TrainingState, device

logger = logging.getLogger(__name__)


def get_batch(batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """Split ``seq_length + 1`` tokens into inputs and next-token labels."""
    tokens = batch["tokens"].to(device(), non_blocking=True)
    return tokens[:, :-1].contiguous(), tokens[:, 1:].contiguous()


def _dp_mean(value: float, state: TrainingState) -> float:
    if state.dp_size == 1:
        return value
    t = torch.tensor([value], dtype=torch.float64)
    torch.distributed.all_reduce(t)
    return t.item() / state.world_size


def _grad_norm(model: torch.nn.Module) -> float:
    norms = [p.grad.detach().float().norm() for p in model.parameters() if p.grad is not None]
    return torch.linalg.vector_norm(torch.stack(norms)).item() if norms else 0.0


def sparsity_scale(state: TrainingState, iteration: int) -> float:
    """Sparsity warm-up: the ratio ramps linearly from 0 to its target over the warm-up."""
    w = state.cfg.qsparse.warmup_iters
    return 1.0 if w <= 0 else min(1.0, iteration / w)


@torch.no_grad()
def evaluate(state: TrainingState, dataset, eval_index: int) -> float | None:
    """Mean token loss over ``--eval-iters`` micro-batches of ``dataset`` (None without data)."""
    cfg = state.cfg
    if dataset is None or cfg.train.eval_iters == 0:
        return None
    gbs = cfg.train.micro_batch_size * state.dp_size
    start = (eval_index * cfg.train.eval_iters * gbs) % max(1, len(dataset))
    if start + cfg.train.eval_iters * gbs > len(dataset):
        start = 0
    loader = build_pretraining_data_loader(dataset, start, cfg.train.micro_batch_size,
                                           state.dp_rank, state.dp_size)
    state.engine.eval()
    total, count = 0.0, 0
    with recording(state.model, False):
        for i, batch in enumerate(loader):
            if i >= cfg.train.eval_iters:
                break
            tokens, labels = get_batch(batch)
            total += state.engine(tokens, labels).float().mean().item()
            count += 1
    state.engine.train()
    return _dp_mean(total / max(1, count), state)


def train(state: TrainingState) -> dict:
    """Run ``--train-iters`` optimizer steps; returns the run summary (rank 0's view)."""
    cfg = state.cfg
    engine, model = state.engine, state.model
    gas = grad_accumulation_steps(cfg, state.world_size)
    gbs = cfg.train.micro_batch_size * state.dp_size * gas
    tokens_per_step = gbs * cfg.model.seq_length
    writer = Writer(cfg.log.tensorboard_dir, state.rank)
    writer.text("config", "```\n" + str(cfg.to_dict()) + "\n```")

    data_iter = None
    if state.iteration < cfg.train.train_iters:
        loader = build_pretraining_data_loader(state.train_ds, state.consumed_samples,
                                               cfg.train.micro_batch_size, state.dp_rank,
                                               state.dp_size, cfg.data.num_workers)
        data_iter = iter(loader)
    else:
        logger.info("checkpoint is at iteration %d, --train-iters is %d: nothing to train",
                    state.iteration, cfg.train.train_iters)
    # DeepSpeed reports the norm for ZeRO >= 1 and bf16; for fp32 ZeRO-0 we measure it.
    measure_norm = engine.zero_optimization_stage() == 0 and not engine.bfloat16_enabled()

    summary: dict = {"train_loss": None, "valid_loss": None, "tokens_per_sec": None,
                     "density": {}, "iterations": 0, "first_loss": None}
    interval_loss, interval_steps = 0.0, 0
    interval_start = time.perf_counter()
    run_time, run_steps = 0.0, 0
    engine.train()
    reset_density(model)
    it = start_iteration = state.iteration
    while it < cfg.train.train_iters:
        step_start = time.perf_counter()
        scale = sparsity_scale(state, it)
        set_sparsity_scale(model, scale)
        # Density is measured on the last step of each log interval: counting non-zeros costs
        # ~7% of a matmul per projection, too much to pay on every step at scale.
        logs_now = (it + 1) % cfg.log.log_interval == 0 or it + 1 == cfg.train.train_iters
        set_recording(model, logs_now)
        loss_sum, grad_norm = 0.0, None
        for micro in range(gas):
            tokens, labels = get_batch(next(data_iter))
            loss = engine(tokens, labels).float().mean()
            engine.backward(loss)
            if micro == gas - 1 and measure_norm:
                grad_norm = _grad_norm(model)  # fp32 ZeRO-0: DeepSpeed does not report it
            engine.step()
            loss_sum += loss.item()
        it += 1
        state.iteration = it
        state.consumed_samples += gbs
        loss_value = loss_sum / gas
        if not math.isfinite(loss_value):
            raise FloatingPointError(f"loss became {loss_value} at iteration {it}; lower --lr "
                                     "or raise --lr-warmup-iters")
        if grad_norm is None:
            grad_norm = engine.get_global_grad_norm()
            grad_norm = float(grad_norm) if grad_norm is not None else None
        if summary["first_loss"] is None:
            summary["first_loss"] = _dp_mean(loss_value, state)
        interval_loss += loss_value
        interval_steps += 1
        step_time = time.perf_counter() - step_start
        if it > start_iteration + 1:  # the first step pays one-off costs; leave it out of throughput
            run_time += step_time
            run_steps += 1

        if it % cfg.log.log_interval == 0 or it == cfg.train.train_iters:
            elapsed = time.perf_counter() - interval_start
            mean_loss = _dp_mean(interval_loss / interval_steps, state)
            density = collect_density(model)
            if not cfg.log.log_sparsity_per_layer:
                density = {k: v for k, v in density.items() if k.startswith("kind/")}
            stats = {"consumed_samples": state.consumed_samples,
                     "ms_per_iter": 1000 * elapsed / interval_steps,
                     "lr": state.scheduler.get_lr()[0], "global_batch_size": gbs,
                     "loss": mean_loss, "grad_norm": grad_norm,
                     "tokens_per_sec": tokens_per_step * interval_steps / elapsed,
                     "density": density, "skipped": getattr(engine, "skipped_steps", 0)}
            logger.info(console_line(it, cfg.train.train_iters, stats))
            scalars = {"lm-loss": mean_loss, "learning-rate": stats["lr"],
                       "grad-norm": grad_norm, "tokens-per-sec": stats["tokens_per_sec"],
                       "iteration-time-ms": stats["ms_per_iter"],
                       "sparsity-scale": scale,
                       "consumed-samples": float(state.consumed_samples)}
            scalars.update({f"density/{k}": v for k, v in density.items()})
            writer.scalars(scalars, it)
            summary["train_loss"] = mean_loss
            summary["density"] = {k: v for k, v in density.items() if k.startswith("kind/")}
            reset_density(model)
            interval_loss, interval_steps = 0.0, 0
            interval_start = time.perf_counter()

        if cfg.train.eval_interval and it % cfg.train.eval_interval == 0 \
                and it != cfg.train.train_iters:
            _log_eval(state, writer, it, it // cfg.train.eval_interval)
        if cfg.train.save and cfg.train.save_interval and it % cfg.train.save_interval == 0:
            checkpointing.save(engine, cfg, it, state.consumed_samples)

    summary["iterations"] = it
    summary["valid_loss"] = _log_eval(state, writer, it, it // max(1, cfg.train.eval_interval))
    if run_steps:
        summary["tokens_per_sec"] = tokens_per_step * run_steps / run_time
    trained = it > start_iteration
    if cfg.train.save and trained and (not cfg.train.save_interval or it % cfg.train.save_interval):
        checkpointing.save(engine, cfg, it, state.consumed_samples)
    writer.close()
    return summary


def _log_eval(state: TrainingState, writer: Writer, it: int, index: int) -> float | None:
    loss = evaluate(state, state.valid_ds, index)
    if loss is None:
        return None
    ppl = math.exp(min(20.0, loss))
    line = f" validation loss at iteration {it} | lm loss value: {loss:.6E} | lm loss PPL: {ppl:.6E} |"
    logger.info("-" * len(line) + "\n" + line + "\n" + "-" * len(line))
    writer.scalars({"lm-loss-validation/lm loss": loss, "lm-loss-validation/lm loss ppl": ppl}, it)
    return loss
