"""Console logging setup, the Megatron-style console line and the TensorBoard scalars of a log
interval (TensorBoard written by rank 0 only)."""

from __future__ import annotations

import logging
import math
import os
from typing import Any

logger = logging.getLogger("megatron_qsparse")


def setup_logging(rank: int) -> None:
    """Console logging for the library: INFO on rank 0, warnings only elsewhere."""
    level = logging.INFO if rank == 0 else logging.WARNING
    root = logging.getLogger("megatron_qsparse")
    if not root.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("[%(asctime)s] %(message)s", "%H:%M:%S"))
        root.addHandler(handler)
    root.setLevel(level)
    root.propagate = False


class Writer:
    """TensorBoard writer that is a no-op off rank 0 or without ``--tensorboard-dir``."""

    def __init__(self, tensorboard_dir: str | None, rank: int):
        self._tb = None
        if tensorboard_dir and rank == 0:
            from torch.utils.tensorboard import SummaryWriter

            os.makedirs(tensorboard_dir, exist_ok=True)
            self._tb = SummaryWriter(log_dir=tensorboard_dir, max_queue=100)

    def scalars(self, values: dict[str, float], step: int) -> None:
        if self._tb is None:
            return
        for name, value in values.items():
            if value is not None and math.isfinite(value):
                self._tb.add_scalar(name, value, step)

    def text(self, name: str, text: str, step: int = 0) -> None:
        if self._tb is not None:
            self._tb.add_text(name, text, step)

    def flush(self) -> None:
        if self._tb is not None:
            self._tb.flush()

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()
            self._tb = None


def memory_stats() -> dict[str, float]:
    """Peak memory: CUDA allocator high-water mark on GPU, the process's max RSS on CPU (GB)."""
    import torch

    if torch.cuda.is_available():
        return {"memory/max-allocated-gb": torch.cuda.max_memory_allocated() / 2**30,
                "memory/allocated-gb": torch.cuda.memory_allocated() / 2**30}
    import resource

    return {"memory/max-rss-gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}


def format_density(density: dict[str, float]) -> str:
    kinds = [(k.split("/", 1)[1], v) for k, v in density.items() if k.startswith("kind/")]
    return " ".join(f"{k} {v:.3f}" for k, v in kinds)


def console_line(it: int, train_iters: int, stats: dict[str, Any]) -> str:
    """One Megatron-LM-style progress line."""
    parts = [f" iteration {it:8d}/{train_iters:8d}",
             f"consumed samples: {stats['consumed_samples']:12d}",
             f"elapsed time per iteration (ms): {stats['ms_per_iter']:.1f}",
             f"learning rate: {stats['lr']:.3E}",
             f"global batch size: {stats['global_batch_size']:5d}",
             f"lm loss: {stats['loss']:.6E}"]
    if stats.get("grad_norm") is not None:
        parts.append(f"grad norm: {stats['grad_norm']:.3f}")
    parts.append(f"tokens/s: {stats['tokens_per_sec']:.0f}")
    if stats.get("tflops") is not None:
        parts.append(f"TFLOP/s/rank: {stats['tflops']:.3f} (activated {stats['tflops_activated']:.3f})")
    if stats.get("activated_params") is not None:
        parts.append(f"activated params: {stats['activated_params'] / 1e6:.3f}M")
    if stats.get("activated_flops") is not None:
        parts.append(f"activated FLOPs/token: {stats['activated_flops'] / 1e6:.2f}M")
    if stats.get("moe"):
        moe = stats["moe"]
        parts.append(f"moe aux loss: {moe['aux']:.4f} | moe z loss: {moe['z']:.4f} | "
                     f"moe dropped: {moe['dropped']:.3f}")
    if stats.get("memory_gb") is not None:
        parts.append(f"mem GB: {stats['memory_gb']:.2f}")
    if stats.get("density"):
        parts.append(f"density: {format_density(stats['density'])}")
    if stats.get("skipped"):
        parts.append(f"number of skipped iterations: {stats['skipped']:3d}")
    return " | ".join(parts) + " |"


def tensorboard_scalars(stats: dict[str, Any], *, density: dict[str, float],
                        grad_norms: dict[str, float], memory: dict[str, float],
                        sparsity_scale: float, loss_spikes: int, loss_scale=None) -> dict:
    """The TensorBoard scalars of one log interval. ``stats`` is the dict of the console line
    (:func:`console_line`), ``density`` every measured density (per kind and per layer),
    ``grad_norms`` the per-projection gradient norms, ``memory`` :func:`memory_stats`;
    ``loss_scale`` is logged when it is a number (fp16 loss scaling)."""
    scalars = {"lm-loss": stats["loss"], "learning-rate": stats["lr"],
               "grad-norm": stats["grad_norm"], "tokens-per-sec": stats["tokens_per_sec"],
               "iteration-time-ms": stats["ms_per_iter"],
               "tflops-per-gpu/dense": stats["tflops"],
               "tflops-per-gpu/activated": stats["tflops_activated"],
               "activated-params": stats["activated_params"], "sparsity-scale": sparsity_scale,
               "skipped-iterations": float(stats["skipped"]), "loss-spikes": float(loss_spikes),
               "consumed-samples": float(stats["consumed_samples"]), **memory}
    if isinstance(loss_scale, (int, float)):
        scalars["loss-scale"] = float(loss_scale)
    scalars.update({f"density/{k}": v for k, v in density.items()})
    scalars.update({f"grad-norm/{k}": v for k, v in grad_norms.items()})
    scalars["activated-flops-per-token"] = stats["activated_flops"]
    scalars.update(moe_scalars(stats["moe"]))
    return scalars


def moe_scalars(moe: dict) -> dict[str, float]:
    """TensorBoard scalars of the MoE statistics (empty for a dense model): per layer each
    expert's share of the routes, the dropped fraction, aux and z losses, then their means."""
    scalars: dict[str, float] = {}
    for layer, st in moe.get("layers", {}).items():
        scalars.update({f"moe/layer{layer}/expert{j}": f for j, f in enumerate(st["load"])})
        scalars.update({f"moe/layer{layer}/dropped-fraction": st["dropped"],
                        f"moe/layer{layer}/aux-loss": st["aux"],
                        f"moe/layer{layer}/z-loss": st["z"]})
    if moe:
        scalars.update({"moe/aux-loss": moe["aux"], "moe/z-loss": moe["z"],
                        "moe/dropped-fraction": moe["dropped"]})
    return scalars
