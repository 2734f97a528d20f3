"""The pieces of a training iteration that :class:`~megatron_qsparse.training.trainer.Trainer`
composes: batches and data iteration, reductions over ranks, the evaluation loss, per-projection
gradient norms, the sparsity warm-up, the exit-signal handler, the loss-spike detector and the
run summary's sparsity fields."""

from __future__ import annotations

import logging
import math
import signal

import torch

from megatron_qsparse.config import DOCUMENT_FIELDS, Config, grad_accumulation_steps
from megatron_qsparse.data.sampler import build_pretraining_data_loader
from megatron_qsparse.model.gpt import mean_loss
from megatron_qsparse.parallel.layers import ColumnParallelLinear, RowParallelLinear
from megatron_qsparse.parallel.state import get_parallel_state
from megatron_qsparse.parallel.utils import sum_squares_over_tp
from megatron_qsparse.sparsity import describe, recording, summary
from megatron_qsparse.training.setup import TrainingState, device

logger = logging.getLogger(__name__)


def get_batch(batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """Split ``seq_length + 1`` tokens into inputs and next-token labels; with a ``loss_mask``
    (SFT data) the labels of untrained targets (prompt, padding) are ``-100``."""
    tokens = batch["tokens"].to(device(), non_blocking=True)
    labels = tokens[:, 1:]
    if "loss_mask" in batch:
        mask = batch["loss_mask"].to(device(), non_blocking=True)[:, 1:]
        labels = labels.masked_fill(mask == 0, -100)
    return tokens[:, :-1].contiguous(), labels.contiguous()


def document_inputs(batch: dict) -> dict[str, torch.Tensor]:
    """The ``position_ids``/``segment_ids`` of the inputs (``[:, :-1]``) when the batch carries
    them (packed SFT, ``--reset-position-ids``, ``--reset-attention-mask``), in
    :data:`~megatron_qsparse.config.DOCUMENT_FIELDS` order: keyword arguments of the model."""
    return {k: batch[k].to(device(), non_blocking=True)[:, :-1].contiguous()
            for k in DOCUMENT_FIELDS if k in batch}


def pipeline_group(state: TrainingState):
    """The pipeline process group when the model is split into stages, else None."""
    p = state.parallel
    return p.pp_group if p is not None and p.pp_size > 1 else None


def pipeline_pairs(data_iter):
    """``(inputs, labels)`` micro-batches, the form DeepSpeed's pipeline engine reads (its first
    stage takes the inputs, its last the labels); the inputs are ``(tokens, *extras)`` when the
    batches carry position/segment ids (``model/pipeline.py`` passes them through the stages)."""
    for batch in data_iter:
        tokens, labels = get_batch(batch)
        extras = document_inputs(batch)
        yield ((tokens, *extras.values()) if extras else tokens), labels


def iterate_loader(loader):
    """Iterate a DataLoader without touching the global RNG (creating a DataLoader iterator draws
    a seed from it, which would shift dropout after a resume or an evaluation)."""
    with torch.random.fork_rng(devices=[]):
        it = iter(loader)
    return it


def all_reduce_values(values: list[float], state: TrainingState, op=None) -> list[float]:
    """``values`` reduced (default: summed) over all ranks."""
    if state.world_size == 1:
        return values
    t = torch.tensor(values, dtype=torch.float64)
    torch.distributed.all_reduce(t, op=op or torch.distributed.ReduceOp.SUM)
    return t.tolist()


def dp_mean(value: float, state: TrainingState) -> float:
    """Mean over the data-parallel ranks (the TP/PP ranks of one DP rank hold the same value)."""
    parallel = state.parallel
    if parallel is None:  # no topology: every rank is a data-parallel rank
        return all_reduce_values([value], state)[0] / state.world_size if state.world_size > 1 else value
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
def evaluate_loss(state: TrainingState, dataset, eval_index: int) -> float | None:
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
    if pipeline_group(state) is not None:
        # the pipeline engine averages over the micro-batches and data-parallel ranks and
        # broadcasts the loss to every stage
        with recording(state.model, False):
            loss = state.engine.eval_batch(pipeline_pairs(iterate_loader(loader)),
                                           num_micro_batches=micro_batches)
        state.engine.module.train()
        return float(loss)
    state.engine.eval()
    total, count = 0.0, 0
    with recording(state.model, False):
        for i, batch in enumerate(iterate_loader(loader)):
            if i >= micro_batches:
                break
            tokens, labels = get_batch(batch)
            per_token = state.engine(tokens, labels, **document_inputs(batch))
            total += mean_loss(per_token, labels).item()
            count += 1
    state.engine.train()
    return dp_mean(total / max(1, count), state)


class ExitSignals:
    """SIGTERM/SIGUSR1 (preemption) set a flag; the trainer saves and exits after the
    iteration. ``restore`` puts the previous handlers back."""

    SIGNALS = (signal.SIGTERM, signal.SIGUSR1)

    def __init__(self, enabled: bool):
        self.received: int | None = None
        self._previous = {}
        if enabled:
            for sig in self.SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)

    @property
    def enabled(self) -> bool:
        """Whether the handlers are installed (``--exit-signal-handler``)."""
        return bool(self._previous)

    def _handle(self, signum, frame) -> None:
        self.received = signum

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


class SpikeDetector:
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


def moe_summary(per_layer: dict, state: TrainingState) -> dict:
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
        flat = [v / state.dp_size for v in all_reduce_values(flat, state)]
    out, width = {}, E + 3
    for n, i in enumerate(layers):
        row = flat[n * width:(n + 1) * width]
        out[i] = {"load": row[:E], "dropped": row[E], "aux": row[E + 1], "z": row[E + 2]}
    mean = lambda key: sum(v[key] for v in out.values()) / len(out)  # noqa: E731
    return {"layers": out, "aux": mean("aux"), "z": mean("z"), "dropped": mean("dropped")}


def sparsity_summary(cfg: Config) -> dict:
    """The run summary's description of the sparsifier: its ratio (0 for methods without one;
    ``tools/scaling_law.py runs`` reads it), mode and one-line description."""
    q = cfg.qsparse
    ratio = summary(q)["qsparse_ratio"]
    return {"sparsity_ratio": 0.0 if ratio is None else ratio, "sparsity_mode": q.mode,
            "sparsity": describe(q)}
