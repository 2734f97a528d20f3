"""The training loop as an object (torchtitan style): :class:`Trainer` runs iterations over the
DeepSpeed engine (:meth:`~Trainer.step`), logs every ``--log-interval`` (:meth:`~Trainer.log`),
evaluates every ``--eval-interval`` (:meth:`~Trainer.evaluate`), saves every ``--save-interval``
(:meth:`~Trainer.maybe_save`) and stops at ``--train-iters`` or an exit condition, returning the
run summary. The per-iteration pieces it composes live in :mod:`~megatron_qsparse.training.loop`."""

from __future__ import annotations

import logging
import math
import signal
import time
from dataclasses import dataclass, field

import torch

from megatron_qsparse.config import grad_accumulation_steps
from megatron_qsparse.data.sampler import build_pretraining_data_loader
from megatron_qsparse.model.accounting import (activated_parameters, count_parameters,
                                               flops_per_token)
from megatron_qsparse.model.gpt import mean_loss
from megatron_qsparse.model.moe import moe_aux_loss, moe_stats, reset_moe_stats
from megatron_qsparse.sparsity import (collect_density, reset_density, set_recording,
                                       set_sparsity_scale)
from megatron_qsparse.training import checkpointing
from megatron_qsparse.training.logging import (Writer, console_line, memory_stats,
                                               tensorboard_scalars)
from megatron_qsparse.training.loop import (ExitSignals, SpikeDetector, all_reduce_values,
                                            document_inputs, dp_mean, evaluate_loss, get_batch,
                                            iterate_loader, moe_summary, pipeline_group,
                                            pipeline_pairs, projection_grad_norms,
                                            sparsity_scale, sparsity_summary)
from megatron_qsparse.training.optim import optimizer_clips
from megatron_qsparse.training.setup import TrainingState

logger = logging.getLogger(__name__)


class TrainingStopped(RuntimeError):
    """The run cannot go on (e.g. gradients stayed non-finite); the message says why."""


@dataclass
class Interval:
    """The accumulators of the current log interval."""

    loss: float = 0.0  # sum of the losses of the applied (not skipped) steps
    applied: int = 0  # steps whose update was applied
    steps: int = 0  # all steps, skipped ones included
    start: float = field(default_factory=time.perf_counter)

    @property
    def mean_loss(self) -> float:
        return self.loss / self.applied if self.applied else float("nan")


class Trainer:
    """Trains ``state`` (from :func:`~megatron_qsparse.training.setup.setup`, a checkpoint
    already loaded into it) with :meth:`train`; every rank runs one, in step."""

    def __init__(self, state: TrainingState):
        cfg = self.cfg = state.cfg
        self.state = state
        self.engine, self.model, self.optimizer = state.engine, state.model, state.optimizer
        self.gas = grad_accumulation_steps(cfg, state.world_size)
        self.gbs = cfg.train.micro_batch_size * state.dp_size * self.gas
        self.tokens_per_step = self.gbs * cfg.model.seq_length
        self.dense_flops = flops_per_token(cfg.model, self.model.vocab_size, cfg.model.seq_length)
        self.pipelined = pipeline_group(state) is not None
        # DeepSpeed reports the norm for ZeRO >= 1 and bf16; for fp32 ZeRO-0 our optimizer does.
        self.own_norm = optimizer_clips(cfg)
        self.writer = Writer(cfg.log.tensorboard_dir, state.rank)
        self.writer.text("config", "```\n" + str(cfg.to_dict()) + "\n```")
        self.spikes = SpikeDetector(cfg.train.loss_spike_factor)
        self.summary = self._new_summary()
        # run state, (re)set by train()
        self.signals: ExitSignals | None = None
        self.data_iter = None
        self.run_start = time.time()
        self.start_iteration = state.iteration
        self.interval = Interval()
        self.run_time, self.run_steps = 0.0, 0  # measured steps (throughput)
        # of the last step, logged when the interval ends there
        self.scale = 1.0
        self.grad_norm: float | None = None
        self.proj_norms: dict[str, float] = {}

    def _new_summary(self) -> dict:
        cfg, model = self.cfg, self.model
        return {"train_loss": None, "valid_loss": None, "test_loss": None,
                "tokens_per_sec": None, "density": {}, "iterations": 0, "first_loss": None,
                "skipped_iterations": 0, "loss_spikes": 0, "exit_reason": "finished",
                "parameters": count_parameters(model),
                "non_embedding_parameters": count_parameters(model, non_embedding=True),
                **sparsity_summary(cfg),
                "bits": 1.58 if cfg.qsparse.bitnet else 16}

    # -- the run ------------------------------------------------------------------------------

    def train(self) -> dict:
        """Run until ``--train-iters`` (or an exit condition); returns the run summary."""
        self.signals = ExitSignals(self.cfg.train.exit_signal_handler)
        try:
            self._start()
            while self.state.iteration < self.cfg.train.train_iters:
                self.step()
                if self._after_step():
                    break
        finally:
            self.signals.restore()
        return self._finish()

    def _start(self) -> None:
        """The data iterator from the consumed samples on, the interval and throughput clocks."""
        state, t = self.state, self.cfg.train
        self.run_start = time.time()
        self.start_iteration = state.iteration
        if state.iteration < t.train_iters:
            loader = build_pretraining_data_loader(state.train_ds, state.consumed_samples,
                                                   t.micro_batch_size, state.dp_rank,
                                                   state.dp_size, self.cfg.data.num_workers)
            self.data_iter = iterate_loader(loader)
            if self.pipelined:
                self.data_iter = pipeline_pairs(self.data_iter)
        else:
            logger.info("checkpoint is at iteration %d, --train-iters is %d: nothing to train",
                        state.iteration, t.train_iters)
        self.engine.train()
        reset_density(self.model)
        self.interval = Interval()
        self.run_time, self.run_steps = 0.0, 0

    def _after_step(self) -> bool:
        """Log, evaluate and save where an interval ends; True when the run should stop."""
        it, t = self.state.iteration, self.cfg.train
        if self._ends_log_interval(it):
            self.log()
        if t.eval_interval and it % t.eval_interval == 0 and it != t.train_iters:
            self.evaluate(self.state.valid_ds, it // t.eval_interval, "validation")
        saved = self.maybe_save()
        return self._maybe_exit(saved)

    def _finish(self) -> dict:
        """Complete the summary; after a finished run evaluate (validation, ``--test``) and save
        the last iteration if no interval save did."""
        state, t, summary = self.state, self.cfg.train, self.summary
        it = state.iteration
        summary["iterations"] = it
        summary["skipped_iterations"] = getattr(self.optimizer, "skipped_iters", 0)
        summary["loss_spikes"] = self.spikes.count
        if self.run_steps:
            summary["tokens_per_sec"] = self.tokens_per_step * self.run_steps / self.run_time
        if summary["exit_reason"] == "finished":
            if t.eval_interval:  # --eval-interval 0: no evaluation at all
                summary["valid_loss"] = self.evaluate(state.valid_ds, it // t.eval_interval,
                                                      "validation")
            if t.test:
                summary["test_loss"] = self.evaluate(state.test_ds, 0, "test")
            last_saved = t.save_interval and it % t.save_interval == 0
            if t.save and it > self.start_iteration and not last_saved:
                self.save()
            elif it > self.start_iteration and checkpointing.non_finite_state(self.engine):
                raise TrainingStopped(f"the weights hold NaN/Inf after iteration {it}; lower "
                                      "--lr or raise --lr-warmup-iters")
        self.writer.close()
        return summary

    def _ends_log_interval(self, iteration: int) -> bool:
        t = self.cfg.train
        return iteration % self.cfg.log.log_interval == 0 or iteration == t.train_iters

    # -- one iteration ------------------------------------------------------------------------

    def step(self) -> float:
        """One iteration: every micro-batch forward and backward, then the optimizer step (the
        pipeline engine's ``train_batch`` under pipeline parallelism). Returns the loss, the
        mean over micro-batches and data-parallel ranks."""
        state = self.state
        it = state.iteration
        step_start = time.perf_counter()
        self.scale = sparsity_scale(state, it)
        set_sparsity_scale(self.model, self.scale)
        # Density is measured on the last step of each log interval: counting non-zeros costs
        # ~7% of a matmul per projection, too much to pay on every step at scale.
        logs_now = self._ends_log_interval(it + 1)
        set_recording(self.model, logs_now)
        self.grad_norm = None
        self.proj_norms.clear()
        loss = self._pipeline_batch(logs_now) if self.pipelined else self._micro_batches(logs_now)
        state.iteration = it + 1
        state.consumed_samples += self.gbs
        self._account(loss)
        if state.iteration > self.start_iteration + 1:  # the first step pays one-off costs
            self.run_time += time.perf_counter() - step_start
            self.run_steps += 1
        return loss

    def _pipeline_batch(self, logs_now: bool) -> float:
        # all micro-batches through the stages, then the step; projection norms are read by the
        # optimizer just before its update (fp32 ZeRO-0 only)
        self.optimizer.on_step = self._record_projection_norms if logs_now else None
        return float(self.engine.train_batch(data_iter=self.data_iter))

    def _record_projection_norms(self, _optimizer) -> None:
        self.proj_norms.update(projection_grad_norms(self.model))

    def _micro_batches(self, logs_now: bool) -> float:
        engine, model = self.engine, self.model
        loss_sum = None  # a device tensor: the step reads the loss on the host once, at its end
        for micro in range(self.gas):
            batch = next(self.data_iter)
            tokens, labels = get_batch(batch)
            loss = mean_loss(engine(tokens, labels, **document_inputs(batch)), labels)
            aux = moe_aux_loss(model)  # MoE routers' weighted losses (None if dense)
            engine.backward(loss if aux is None else loss + aux)
            if micro == self.gas - 1 and logs_now:
                self._record_projection_norms(self.optimizer)
            engine.step()
            d = loss.detach().double()  # summed in fp64, as Python floats were
            loss_sum = d if loss_sum is None else loss_sum + d
        return dp_mean(float(loss_sum) / self.gas, self.state)

    def _account(self, loss: float) -> None:
        """Count the finished step into the interval: a skipped update (non-finite gradients;
        too many in a row stop the run) or an applied one (its loss and gradient norm)."""
        it, opt = self.state.iteration, self.optimizer
        if getattr(opt, "overflow", False):
            logger.warning("iteration %d: non-finite gradients (loss %s); update skipped "
                           "(%d in a row)", it, loss, opt.consecutive_skips)
            if opt.consecutive_skips >= self.cfg.train.max_consecutive_skipped_iters:
                raise TrainingStopped(
                    f"{opt.consecutive_skips} consecutive iterations had non-finite "
                    f"gradients (last at iteration {it}); lower --lr, raise --lr-warmup-iters "
                    "or resume from an earlier checkpoint")
        else:
            norm = opt.grad_norm if self.own_norm else self.engine.get_global_grad_norm()
            self.grad_norm = float(norm) if norm is not None else None
            if self.summary["first_loss"] is None:
                self.summary["first_loss"] = loss
            if self.spikes(loss):
                logger.warning("iteration %d: loss spike %.4f (recent average %.4f)", it, loss,
                               self.spikes.ema)
            self.interval.loss += loss
            self.interval.applied += 1
        self.interval.steps += 1

    # -- logging and evaluation ---------------------------------------------------------------

    def log(self) -> None:
        """Log the interval that ends at this iteration (console line, TensorBoard scalars, the
        summary's latest values), then start the next one. Every rank calls this (density and
        MoE statistics are reduced over ranks)."""
        state, cfg, model, iv = self.state, self.cfg, self.model, self.interval
        elapsed = time.perf_counter() - iv.start
        density = collect_density(model, group=pipeline_group(state))
        kinds = {k: v for k, v in density.items() if k.startswith("kind/")}
        tokens_per_sec = self.tokens_per_step * iv.steps / elapsed
        act_flops = flops_per_token(cfg.model, model.vocab_size, cfg.model.seq_length,
                                    density or None)
        n_act = activated_parameters(model, density or None)
        moe = moe_summary(moe_stats(model), state)
        mem = memory_stats()
        stats = {"consumed_samples": state.consumed_samples,
                 "ms_per_iter": 1000 * elapsed / iv.steps, "lr": state.scheduler.get_lr()[0],
                 "global_batch_size": self.gbs, "loss": iv.mean_loss, "grad_norm": self.grad_norm,
                 "tokens_per_sec": tokens_per_sec,
                 "tflops": self.dense_flops * tokens_per_sec / state.world_size / 1e12,
                 "tflops_activated": act_flops * tokens_per_sec / state.world_size / 1e12,
                 "activated_params": n_act, "activated_flops": act_flops, "moe": moe,
                 "density": density if cfg.log.log_sparsity_per_layer else kinds,
                 "skipped": getattr(self.optimizer, "skipped_iters", 0),
                 "memory_gb": mem.get("memory/max-allocated-gb", mem.get("memory/max-rss-gb"))}
        logger.info(console_line(state.iteration, cfg.train.train_iters, stats))
        # engine.optimizer is DeepSpeed's public handle on the wrapped optimizer; loss_scale is
        # a number only under fp16 loss scaling
        self.writer.scalars(tensorboard_scalars(
            stats, density=density, grad_norms=self.proj_norms, memory=mem,
            sparsity_scale=self.scale, loss_spikes=self.spikes.count,
            loss_scale=getattr(self.engine.optimizer, "loss_scale", None)), state.iteration)
        if iv.applied:
            self.summary["train_loss"] = iv.mean_loss
        self.summary.update(density=kinds, activated_params=n_act,
                            activated_flops_per_token=act_flops)
        if moe:
            self.summary["moe"] = moe
        reset_density(model)
        reset_moe_stats(model)
        self.interval = Interval()

    def evaluate(self, dataset, index: int, split: str) -> float | None:
        """The mean loss over ``--eval-iters`` global batches of ``dataset`` (the ``index``-th
        window of it), logged as ``split``; None without data or with ``--eval-iters 0``."""
        it = self.state.iteration
        loss = evaluate_loss(self.state, dataset, index)
        if loss is None:
            return None
        ppl = math.exp(min(20.0, loss))
        line = (f" {split} loss at iteration {it} | lm loss value: {loss:.6E} | "
                f"lm loss PPL: {ppl:.6E} |")
        logger.info("-" * len(line) + "\n" + line + "\n" + "-" * len(line))
        self.writer.scalars({f"lm-loss-{split}/lm loss": loss,
                             f"lm-loss-{split}/lm loss ppl": ppl}, it)
        return loss

    # -- checkpoints and exit -----------------------------------------------------------------

    def maybe_save(self) -> bool:
        """Save on every ``--save-interval``-th iteration (with ``--save``); True if it saved."""
        t = self.cfg.train
        if t.save and t.save_interval and self.state.iteration % t.save_interval == 0:
            self.save()
            return True
        return False

    def save(self) -> None:
        """Checkpoint this iteration (engine, data position, RNG, skipped-iteration count)."""
        state = self.state
        try:
            checkpointing.save(state.engine, self.cfg, state.iteration, state.consumed_samples,
                               dp_size=state.dp_size,
                               extra={"skipped_iterations": getattr(self.optimizer,
                                                                    "skipped_iters", 0)})
        except checkpointing.CheckpointNotWritten as e:  # latest stays on the last good one
            raise TrainingStopped(str(e)) from None

    def _maybe_exit(self, saved: bool) -> bool:
        """On an exit condition record why, save (unless this iteration just did) and say
        True."""
        reason = self.exit_reason()
        if not reason:
            return False
        self.summary["exit_reason"] = reason
        logger.info("exiting at iteration %d: %s", self.state.iteration, reason)
        if self.cfg.train.save and not saved:
            self.save()
        return True

    def exit_reason(self) -> str:
        """Why to stop now ('' to go on), agreed by all ranks."""
        t, it = self.cfg.train, self.state.iteration
        flags = [0.0, 0.0]
        if self.signals is not None and self.signals.received is not None:
            flags[0] = float(self.signals.received)
        minutes = (time.time() - self.run_start) / 60
        if t.exit_duration_in_mins and minutes >= t.exit_duration_in_mins:
            flags[1] = 1.0
        if (self.signals is not None and self.signals.enabled) or t.exit_duration_in_mins:
            flags = all_reduce_values(flags, self.state, op=torch.distributed.ReduceOp.MAX)
        if flags[0]:
            return f"received {signal.Signals(int(flags[0])).name}"
        if flags[1]:
            return f"--exit-duration-in-mins {t.exit_duration_in_mins} reached"
        if t.exit_interval and it % t.exit_interval == 0 and it < t.train_iters:
            return f"--exit-interval {t.exit_interval} reached"
        return ""
