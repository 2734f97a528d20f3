"""Train and evaluation iterations over the DeepSpeed engine."""

from __future__ import annotations

import logging
import math
import signal
import time

import torch

from megatron_qsparse.config import grad_accumulation_steps
from megatron_qsparse.data.sampler import build_pretraining_data_loader
from megatron_qsparse.model.accounting import (activated_parameters, count_parameters,
                                               flops_per_token)
from megatron_qsparse.model.gpt import mean_loss
from megatron_qsparse.model.moe import moe_aux_loss, moe_stats, reset_moe_stats
from megatron_qsparse.parallel.layers import ColumnParallelLinear, RowParallelLinear
from megatron_qsparse.parallel.state import get_parallel_state
from megatron_qsparse.parallel.utils import sum_squares_over_tp
from megatron_qsparse.sparsity import (collect_density, recording, reset_density, set_recording,
                                       set_sparsity_scale)
from megatron_qsparse.training import checkpointing
from megatron_qsparse.training.logging import Writer, console_line, memory_stats
from megatron_qsparse.training.setup import TrainingState, device, optimizer_clips

logger = logging.getLogger(__name__)

class TrainingStopped(RuntimeError):
    """The run cannot go on (e.g. gradients stayed non-finite); the message says why."""


def get_batch(batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """Split ``seq_length + 1`` tokens into inputs and next-token labels; with a ``loss_mask``
    (SFT data) the labels of untrained targets (prompt, padding) are ``-100``."""
    tokens = batch["tokens"].to(device(), non_blocking=True)
    labels = tokens[:, 1:]
    if "loss_mask" in batch:
        mask = batch["loss_mask"].to(device(), non_blocking=True)[:, 1:]
        labels = labels.masked_fill(mask == 0, -100)
    return tokens[:, :-1].contiguous(), labels.contiguous()


def _pipeline_group(state: TrainingState):
    """The pipeline process group when the model is split into stages, else None."""
    p = state.parallel
    return p.pp_group if p is not None and p.pp_size > 1 else None


def _pairs(data_iter):
    """``(inputs, labels)`` micro-batches, the form DeepSpeed's pipeline engine reads (its first
    stage takes the inputs, its last the labels)."""
    for batch in data_iter:
        yield get_batch(batch)


def _iterate(loader):
    """Iterate a DataLoader without touching the global RNG (creating a DataLoader iterator draws
    a seed from it, which would shift dropout after a resume or an evaluation)."""
    with torch.random.fork_rng(devices=[]):
        it = iter(loader)
    return it


def _all_reduce(values: list[float], state: TrainingState, op=None) -> list[float]:
    if state.world_size == 1:
        return values
    t = torch.tensor(values, dtype=torch.float64)
    torch.distributed.all_reduce(t, op=op or torch.distributed.ReduceOp.SUM)
    return t.tolist()


def _dp_mean(value: float, state: TrainingState) -> float:
    """Mean over the data-parallel ranks (the TP/PP ranks of one DP rank hold the same value)."""
    parallel = state.parallel
    if parallel is None:  # no topology: every rank is a data-parallel rank
        return _all_reduce([value], state)[0] / state.world_size if state.world_size > 1 else value
    if parallel.dp_size == 1:
        return value
    t = torch.tensor([value], dtype=torch.float64)
    torch.distributed.all_reduce(t, group=parallel.dp_group)
    return t.item() / parallel.dp_size


def _over_pipeline(values: dict, state_parallel) -> dict:
    """Merge per-stage dicts (disjoint keys) over the pipeline stages (every stage calls this)."""
    if state_parallel is None or state_parallel.pp_size == 1:
        return values
    gathered = [None] * state_parallel.pp_size
    torch.distributed.all_gather_object(gathered, values, group=state_parallel.pp_group)
    merged = {}
    for part in gathered:
        merged.update(part)
    return merged


def projection_grad_norms(model: torch.nn.Module) -> dict[str, float]:
    """Gradient L2 norm of every projection weight, ``layer<i>/<kind>`` (the paper's STE
    diagnostic: without STE the lower layers' norms collapse), over all pipeline stages (every
    stage must call this). Empty when the gradients live only in ZeRO partitions."""
    squares = {}
    for m in model.modules():
        sp = getattr(m, "sparsifier", None)
        if isinstance(m, (ColumnParallelLinear, RowParallelLinear)) and sp is not None \
                and m.weight.grad is not None:
            squares[f"layer{sp.layer}/{sp.kind}"] = m.weight.grad.detach().double().square().sum()
    parallel = get_parallel_state()
    if parallel.tp_size > 1 and squares:  # each weight is a shard: add squares over the TP group
        total = sum_squares_over_tp(torch.stack(list(squares.values())), parallel)
        squares = dict(zip(squares, total))
    norms = {k: math.sqrt(float(v)) for k, v in squares.items()}
    return _over_pipeline(norms, parallel)


def sparsity_scale(state: TrainingState, iteration: int) -> float:
    """Sparsity warm-up: the ratio ramps linearly from 0 to its target over the warm-up."""
    w = state.cfg.qsparse.warmup_iters
    return 1.0 if w <= 0 else min(1.0, iteration / w)


@torch.no_grad()
def evaluate(state: TrainingState, dataset, eval_index: int) -> float | None:
    """Mean token loss over ``--eval-iters`` global batches of ``dataset`` (None without data):
    the same samples whatever the layout (each data-parallel rank reads its share of every
    global batch, in micro-batches)."""
    cfg = state.cfg
    if dataset is None or cfg.train.eval_iters == 0:
        return None
    gas = grad_accumulation_steps(cfg, state.world_size)
    gbs = cfg.train.micro_batch_size * state.dp_size * gas
    micro_batches = cfg.train.eval_iters * gas  # per data-parallel rank
    start = (eval_index * cfg.train.eval_iters * gbs) % max(1, len(dataset))
    if start + cfg.train.eval_iters * gbs > len(dataset):
        start = 0
    loader = build_pretraining_data_loader(dataset, start, cfg.train.micro_batch_size,
                                           state.dp_rank, state.dp_size)
    if _pipeline_group(state) is not None:
        # the pipeline engine averages over the micro-batches and data-parallel ranks and
        # broadcasts the loss to every stage
        with recording(state.model, False):
            loss = state.engine.eval_batch(_pairs(_iterate(loader)),
                                           num_micro_batches=micro_batches)
        state.engine.module.train()
        return float(loss)
    state.engine.eval()
    total, count = 0.0, 0
    with recording(state.model, False):
        for i, batch in enumerate(_iterate(loader)):
            if i >= micro_batches:
                break
            tokens, labels = get_batch(batch)
            total += mean_loss(state.engine(tokens, labels), labels).item()
            count += 1
    state.engine.train()
    return _dp_mean(total / max(1, count), state)


class _ExitSignals:
    """SIGTERM/SIGUSR1 (preemption) set a flag; the loop saves and exits after the iteration."""

    SIGNALS = (signal.SIGTERM, signal.SIGUSR1)

    def __init__(self, enabled: bool):
        self.received: int | None = None
        self._previous = {}
        if enabled:
            for sig in self.SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)

    def _handle(self, signum, frame) -> None:
        self.received = signum

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


class _SpikeDetector:
    """Flags a loss above ``factor`` x its exponential moving average (after a short warm-up)."""

    def __init__(self, factor: float, beta: float = 0.9, warmup: int = 10):
        self.factor, self.beta, self.warmup = factor, beta, warmup
        self.ema, self.seen, self.count = None, 0, 0

    def __call__(self, loss: float) -> bool:
        spike = (self.factor > 0 and self.ema is not None and self.seen >= self.warmup
                 and loss > self.factor * self.ema)
        if spike:
            self.count += 1
        else:  # a spike does not pull the average up
            self.ema = loss if self.ema is None else self.beta * self.ema + (1 - self.beta) * loss
            self.seen += 1
        return spike


def train(state: TrainingState) -> dict:
    """Run until ``--train-iters`` (or an exit condition); returns the run summary."""
    cfg = state.cfg
    t = cfg.train
    engine, model, optimizer = state.engine, state.model, state.optimizer
    gas = grad_accumulation_steps(cfg, state.world_size)
    gbs = cfg.train.micro_batch_size * state.dp_size * gas
    tokens_per_step = gbs * cfg.model.seq_length
    vocab = model.vocab_size
    dense_flops = flops_per_token(cfg.model, vocab, cfg.model.seq_length)
    writer = Writer(cfg.log.tensorboard_dir, state.rank)
    writer.text("config", "```\n" + str(cfg.to_dict()) + "\n```")
    signals = _ExitSignals(t.exit_signal_handler)
    spikes = _SpikeDetector(t.loss_spike_factor)
    run_start = time.time()

    data_iter = None
    pipelined = _pipeline_group(state) is not None
    proj_norms: dict = {}

    def record_projection_norms(_optimizer) -> None:
        proj_norms.update(projection_grad_norms(model))

    if state.iteration < t.train_iters:
        loader = build_pretraining_data_loader(state.train_ds, state.consumed_samples,
                                               t.micro_batch_size, state.dp_rank,
                                               state.dp_size, cfg.data.num_workers)
        data_iter = _iterate(loader)
        if pipelined:
            data_iter = _pairs(data_iter)
    else:
        logger.info("checkpoint is at iteration %d, --train-iters is %d: nothing to train",
                    state.iteration, t.train_iters)
    # DeepSpeed reports the norm for ZeRO >= 1 and bf16; for fp32 ZeRO-0 our optimizer does.
    own_norm = optimizer_clips(cfg)

    summary: dict = {"train_loss": None, "valid_loss": None, "test_loss": None,
                     "tokens_per_sec": None, "density": {}, "iterations": 0, "first_loss": None,
                     "skipped_iterations": 0, "loss_spikes": 0, "exit_reason": "finished",
                     "parameters": count_parameters(model),
                     "non_embedding_parameters": count_parameters(model, non_embedding=True),
                     "sparsity_ratio": cfg.qsparse.ratio if cfg.qsparse.mode == "topk" else 0.0,
                     "sparsity_mode": cfg.qsparse.mode,
                     "bits": 1.58 if cfg.qsparse.bitnet else 16}
    interval_loss, interval_steps, interval_ok = 0.0, 0, 0
    interval_start = time.perf_counter()
    run_time, run_steps = 0.0, 0
    engine.train()
    reset_density(model)
    it = start_iteration = state.iteration
    try:
        while it < t.train_iters:
            step_start = time.perf_counter()
            scale = sparsity_scale(state, it)
            set_sparsity_scale(model, scale)
            # Density is measured on the last step of each log interval: counting non-zeros costs
            # ~7% of a matmul per projection, too much to pay on every step at scale.
            logs_now = (it + 1) % cfg.log.log_interval == 0 or it + 1 == t.train_iters
            set_recording(model, logs_now)
            grad_norm = None
            proj_norms.clear()
            if pipelined:
                # all micro-batches through the stages, then the step; projection norms are read
                # by the optimizer just before its update (fp32 ZeRO-0 only)
                optimizer.on_step = record_projection_norms if logs_now else None
                loss_value = float(engine.train_batch(data_iter=data_iter))
            else:
                loss_sum = 0.0
                for micro in range(gas):
                    tokens, labels = get_batch(next(data_iter))
                    loss = mean_loss(engine(tokens, labels), labels)
                    aux = moe_aux_loss(model)  # MoE routers' weighted losses (None if dense)
                    engine.backward(loss if aux is None else loss + aux)
                    if micro == gas - 1 and logs_now:
                        proj_norms.update(projection_grad_norms(model))
                    engine.step()
                    loss_sum += loss.item()
                loss_value = _dp_mean(loss_sum / gas, state)
            it += 1
            state.iteration = it
            state.consumed_samples += gbs
            skipped = bool(getattr(optimizer, "overflow", False))
            if skipped:
                logger.warning("iteration %d: non-finite gradients (loss %s); update skipped "
                               "(%d in a row)", it, loss_value, optimizer.consecutive_skips)
                if optimizer.consecutive_skips >= t.max_consecutive_skipped_iters:
                    raise TrainingStopped(
                        f"{optimizer.consecutive_skips} consecutive iterations had non-finite "
                        f"gradients (last at iteration {it}); lower --lr, raise --lr-warmup-iters "
                        "or resume from an earlier checkpoint")
            else:
                grad_norm = optimizer.grad_norm if own_norm else engine.get_global_grad_norm()
                grad_norm = float(grad_norm) if grad_norm is not None else None
                if summary["first_loss"] is None:
                    summary["first_loss"] = loss_value
                if spikes(loss_value):
                    logger.warning("iteration %d: loss spike %.4f (recent average %.4f)", it,
                                   loss_value, spikes.ema)
                interval_loss += loss_value
                interval_ok += 1
            interval_steps += 1
            if it > start_iteration + 1:  # the first step pays one-off costs: not in throughput
                run_time += time.perf_counter() - step_start
                run_steps += 1

            if it % cfg.log.log_interval == 0 or it == t.train_iters:
                _log_interval(state, writer, summary, it, interval_loss, interval_ok,
                              interval_steps, time.perf_counter() - interval_start, grad_norm,
                              proj_norms, scale, gbs, tokens_per_step, dense_flops, vocab, spikes)
                interval_loss, interval_steps, interval_ok = 0.0, 0, 0
                interval_start = time.perf_counter()

            if t.eval_interval and it % t.eval_interval == 0 and it != t.train_iters:
                _log_eval(state, writer, it, it // t.eval_interval, state.valid_ds, "validation")
            saved = False
            if t.save and t.save_interval and it % t.save_interval == 0:
                _save(state, it, summary)
                saved = True
            reason = _exit_reason(state, it, run_start, signals)
            if reason:
                summary["exit_reason"] = reason
                logger.info("exiting at iteration %d: %s", it, reason)
                if t.save and not saved:
                    _save(state, it, summary)
                break
    finally:
        signals.restore()

    summary["iterations"] = it
    summary["skipped_iterations"] = getattr(optimizer, "skipped_iters", 0)
    summary["loss_spikes"] = spikes.count
    if run_steps:
        summary["tokens_per_sec"] = tokens_per_step * run_steps / run_time
    if summary["exit_reason"] == "finished":
        summary["valid_loss"] = _log_eval(state, writer, it,
                                          it // max(1, t.eval_interval), state.valid_ds,
                                          "validation")
        if t.test:
            summary["test_loss"] = _log_eval(state, writer, it, 0, state.test_ds, "test")
        last_saved = t.save_interval and it % t.save_interval == 0
        if t.save and it > start_iteration and not last_saved:
            _save(state, it, summary)
    writer.close()
    return summary


def _save(state: TrainingState, it: int, summary: dict) -> None:
    checkpointing.save(state.engine, state.cfg, it, state.consumed_samples, dp_size=state.dp_size,
                       extra={"skipped_iterations": getattr(state.optimizer, "skipped_iters", 0)})


def _exit_reason(state: TrainingState, it: int, run_start: float, signals: _ExitSignals) -> str:
    """Why to stop now ('' to go on), agreed by all ranks."""
    t = state.cfg.train
    flags = [0.0, 0.0]
    if signals.received is not None:
        flags[0] = float(signals.received)
    if t.exit_duration_in_mins and (time.time() - run_start) / 60 >= t.exit_duration_in_mins:
        flags[1] = 1.0
    if signals._previous or t.exit_duration_in_mins:
        flags = _all_reduce(flags, state, op=torch.distributed.ReduceOp.MAX)
    if flags[0]:
        return f"received {signal.Signals(int(flags[0])).name}"
    if flags[1]:
        return f"--exit-duration-in-mins {t.exit_duration_in_mins} reached"
    if t.exit_interval and it % t.exit_interval == 0 and it < t.train_iters:
        return f"--exit-interval {t.exit_interval} reached"
    return ""


def _log_interval(state, writer, summary, it, interval_loss, interval_ok, interval_steps,
                  elapsed, grad_norm, proj_norms, scale, gbs, tokens_per_step, dense_flops,
                  vocab, spikes) -> None:
    cfg, model = state.cfg, state.model
    interval_mean = interval_loss / interval_ok if interval_ok else float("nan")
    density = collect_density(model, group=_pipeline_group(state))
    kinds = {k: v for k, v in density.items() if k.startswith("kind/")}
    shown = density if cfg.log.log_sparsity_per_layer else kinds
    tokens_per_sec = tokens_per_step * interval_steps / elapsed
    act_flops = flops_per_token(cfg.model, vocab, cfg.model.seq_length, density or None)
    n_act = activated_parameters(model, density or None)
    skipped = getattr(state.optimizer, "skipped_iters", 0)
    moe = _moe_summary(moe_stats(model), state)
    mem = memory_stats()
    stats = {"consumed_samples": state.consumed_samples,
             "ms_per_iter": 1000 * elapsed / interval_steps, "lr": state.scheduler.get_lr()[0],
             "global_batch_size": gbs, "loss": interval_mean, "grad_norm": grad_norm,
             "tokens_per_sec": tokens_per_sec,
             "tflops": dense_flops * tokens_per_sec / state.world_size / 1e12,
             "tflops_activated": act_flops * tokens_per_sec / state.world_size / 1e12,
             "activated_params": n_act, "activated_flops": act_flops, "moe": moe,
             "density": shown, "skipped": skipped,
             "memory_gb": mem.get("memory/max-allocated-gb", mem.get("memory/max-rss-gb"))}
    logger.info(console_line(it, cfg.train.train_iters, stats))
    scalars = {"lm-loss": interval_mean, "learning-rate": stats["lr"], "grad-norm": grad_norm,
               "tokens-per-sec": tokens_per_sec, "iteration-time-ms": stats["ms_per_iter"],
               "tflops-per-gpu/dense": stats["tflops"],
               "tflops-per-gpu/activated": stats["tflops_activated"],
               "activated-params": n_act, "sparsity-scale": scale,
               "skipped-iterations": float(skipped), "loss-spikes": float(spikes.count),
               "consumed-samples": float(state.consumed_samples), **mem}
    scale_obj = getattr(state.engine.optimizer, "loss_scale", None)
    if isinstance(scale_obj, (int, float)):
        scalars["loss-scale"] = float(scale_obj)
    scalars.update({f"density/{k}": v for k, v in density.items()})
    scalars.update({f"grad-norm/{k}": v for k, v in proj_norms.items()})
    scalars["activated-flops-per-token"] = act_flops
    for layer, st in moe.get("layers", {}).items():
        scalars.update({f"moe/layer{layer}/expert{j}": f for j, f in enumerate(st["load"])})
        scalars.update({f"moe/layer{layer}/dropped-fraction": st["dropped"],
                        f"moe/layer{layer}/aux-loss": st["aux"],
                        f"moe/layer{layer}/z-loss": st["z"]})
    if moe:
        scalars.update({"moe/aux-loss": moe["aux"], "moe/z-loss": moe["z"],
                        "moe/dropped-fraction": moe["dropped"]})
    writer.scalars(scalars, it)
    if interval_ok:
        summary["train_loss"] = interval_mean
    summary["density"] = kinds
    summary["activated_params"] = n_act
    summary["activated_flops_per_token"] = act_flops
    if moe:
        summary["moe"] = moe
    reset_density(model)
    reset_moe_stats(model)


def _moe_summary(per_layer: dict, state: TrainingState) -> dict:
    """The MoE statistics of a log interval: per layer the fraction of routes each expert got,
    the dropped fraction and the aux / z losses, each the mean over the data-parallel ranks
    (routing is per rank; every rank routes as many tokens); plus their means over layers. Empty
    for a dense model. Every rank must call this."""
    if not per_layer:
        return {}
    layers = sorted(per_layer)
    E = len(per_layer[layers[0]]["load"])
    flat = [v for i in layers for v in
            (*per_layer[i]["load"], per_layer[i]["dropped"], per_layer[i]["aux"], per_layer[i]["z"])]
    if state.dp_size > 1:
        flat = [v / state.dp_size for v in _all_reduce(flat, state)]
    out, width = {}, E + 3
    for n, i in enumerate(layers):
        row = flat[n * width:(n + 1) * width]
        out[i] = {"load": row[:E], "dropped": row[E], "aux": row[E + 1], "z": row[E + 2]}
    mean = lambda key: sum(v[key] for v in out.values()) / len(out)  # noqa: E731
    return {"layers": out, "aux": mean("aux"), "z": mean("z"), "dropped": mean("dropped")}


def _log_eval(state: TrainingState, writer: Writer, it: int, index: int, dataset,
              split: str) -> float | None:
    loss = evaluate(state, dataset, index)
    if loss is None:
        return None
    ppl = math.exp(min(20.0, loss))
    line = (f" {split} loss at iteration {it} | lm loss value: {loss:.6E} | "
            f"lm loss PPL: {ppl:.6E} |")
    logger.info("-" * len(line) + "\n" + line + "\n" + "-" * len(line))
    writer.scalars({f"lm-loss-{split}/lm loss": loss, f"lm-loss-{split}/lm loss ppl": ppl}, it)
    return loss
