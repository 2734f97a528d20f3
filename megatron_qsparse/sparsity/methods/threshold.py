"""Training-free magnitude thresholding (TEAL, Liu et al. 2024): ``--qsparse-mode threshold``.

Every projection zeroes the entries of its input with ``|x|`` below a threshold of its own
(per layer, per projection kind), calibrated on data so that a fraction ``S`` of the entries falls
below it. Unlike Top-K the number kept varies from token to token; the threshold is one number per
projection, so the mask is elementwise (nothing to agree under tensor parallelism) and costs one
comparison per entry.

**Calibration** (:func:`calibrate`, ``tools/calibrate_thresholds.py``): run the model densely over
some data, sample ``|x|`` at the input of every projection, and store its quantiles at the levels
``0, 1/L, ..., 1`` (``L = 100``). Any sparsity ratio then maps to a threshold by linear
interpolation between levels, so ``--qsparse-ratio``, the per-projection ratios and the warm-up
work as they do for Top-K, and one calibration serves every S. The table lives in the config
(``qsparse.calibration``), so it is saved in the checkpoint's metadata and travels with its
conversions::

    {"method": "threshold", "levels": 100, "tokens": <calibration tokens>,
     "thresholds": {"layer0/qkv": [q_0, ..., q_100], "layer0/o": [...], ...}}

Projections that share a (layer, kind), the experts of an MoE layer, share one threshold.
Training with the thresholds fixed works too (STE or ``--no-ste``); decoding uses the generic
sparsify + nonzero-row GEMV path.
"""

from __future__ import annotations

import torch

from megatron_qsparse.config import PROJECTION_KINDS, ConfigError
from megatron_qsparse.sparsity.methods.base import SparsityMethod, register
from megatron_qsparse.sparsity.ste import apply_mask

LEVELS = 100
_FIX = "calibrate it with tools/calibrate_thresholds.py --load CKPT --data-path DATA --save CKPT2"


def threshold_at(table: list[float], ratio: float) -> float:
    """The ``|x|`` threshold that zeroes a fraction ``ratio`` of the calibration sample (0 at
    ratio 0: nothing is dropped), interpolated linearly between the table's levels."""
    if ratio <= 0.0:
        return 0.0
    pos = min(ratio, 1.0) * (len(table) - 1)
    i = min(int(pos), len(table) - 2)
    frac = pos - i
    return float(table[i] + (table[i + 1] - table[i]) * frac)


@register
class Threshold(SparsityMethod):
    """``|x| >= t`` kept, ``t`` the calibrated threshold of this (layer, kind) at its ratio."""

    name = "threshold"
    help = "magnitude threshold calibrated per projection (TEAL, training-free)"
    uses_ratio = True

    def __init__(self, cfg, kind, layer):
        super().__init__(cfg, kind, layer)
        self.ratio = cfg.ratio_for(kind)
        key = f"layer{layer}/{kind}"
        tables = (cfg.calibration or {}).get("thresholds", {})
        if key not in tables:
            raise ValueError(f"--qsparse-mode threshold: no calibrated threshold for {key}; {_FIX}")
        self.table = [float(v) for v in tables[key]]
        self._cache: tuple[float, float] | None = None

    @classmethod
    def check_config(cls, cfg, world_size):
        cal = cfg.qsparse.calibration
        if not cal or cal.get("method") != cls.name or not isinstance(cal.get("thresholds"), dict):
            raise ConfigError(f"--qsparse-mode threshold: the model has no calibrated thresholds; "
                              f"{_FIX}")
        tables = cal["thresholds"]
        for layer in range(cfg.model.num_layers):
            for kind in PROJECTION_KINDS:
                t = tables.get(f"layer{layer}/{kind}")
                if not (isinstance(t, list) and len(t) >= 2
                        and all(isinstance(v, (int, float)) for v in t)
                        and all(a <= b for a, b in zip(t, t[1:]))):
                    raise ConfigError(f"--qsparse-calibration: the threshold table of "
                                      f"layer{layer}/{kind} is missing or not a non-decreasing "
                                      f"list of numbers (the calibration is for another model?); "
                                      f"{_FIX}")

    @classmethod
    def describe(cls, q) -> str:
        return f"threshold S={q.ratio} (TEAL)" + (" int8" if q.quantize_activations else "")

    def threshold(self, sp) -> float:
        """This projection's threshold at its ratio and the current warm-up scale."""
        ratio = self.ratio * sp.ratio_scale
        if self._cache is None or self._cache[0] != ratio:
            self._cache = (ratio, threshold_at(self.table, ratio))
        return self._cache[1]

    def sparsify(self, x, sp, stats):
        t = self.threshold(sp)
        y = x if t <= 0.0 else apply_mask(x, x.detach().abs() >= t, ste=sp.ste)
        if stats is not None:
            stats.record(y)
        return y

    def decode_keep(self, sp, d):
        return "magnitude threshold (a varying number kept per token)"

    def decode_step_op(self, sp, d):
        return {"op": "threshold", "t": self.threshold(sp)}

    def extra_repr(self, sp):
        return f"ratio={self.ratio}, threshold={self.threshold(sp):.4g}, ste={sp.ste}"


class _Recorder(SparsityMethod):
    """Stand-in during calibration: passes ``x`` through (a dense forward) and samples ``|x|``."""

    name = "calibration-recorder"

    def __init__(self, samples: list, per_call: int, generator: torch.Generator):
        self.samples, self.per_call, self.generator = samples, per_call, generator

    def sparsify(self, x, sp, stats):
        a = x.detach().abs().flatten().float()
        if a.numel() > self.per_call:
            idx = torch.randint(a.numel(), (self.per_call,), generator=self.generator)
            a = a[idx.to(a.device)]
        self.samples.append(a.cpu())
        return x

    def sparsify_sharded(self, x, sp, row):
        raise ValueError("calibrate thresholds on a tensor-parallel size 1 model")


@torch.no_grad()
def calibrate(model: torch.nn.Module, batches, *, levels: int = LEVELS,
              per_call: int = 1 << 16, max_samples: int = 1 << 22, seed: int = 0) -> dict:
    """Quantile tables of ``|x|`` at every projection's input over ``batches`` (an iterable of
    ``[b, s]`` token tensors), from a dense forward of ``model`` (TP = 1). Returns the
    ``qsparse.calibration`` dict described in the module docstring; ``model`` is left as it was.
    """
    gen = torch.Generator().manual_seed(seed)
    samples: dict[str, list] = {}
    swapped = []
    for m in model.modules():  # the Sparsifier modules: they hold a method
        if isinstance(getattr(m, "method", None), SparsityMethod):
            key = f"layer{m.layer}/{m.kind}"
            swapped.append((m, m.method))
            m.method = _Recorder(samples.setdefault(key, []), per_call, gen)
    if not swapped:
        raise ValueError("calibrate: the model has no sparsifiers")
    tokens = 0
    was_training = model.training
    model.eval()
    try:
        for batch in batches:
            model(batch)
            tokens += batch.numel()
    finally:
        for m, method in swapped:
            m.method = method
        model.train(was_training)
    if not tokens:
        raise ValueError("calibrate: no calibration tokens (the data is empty)")
    tables = {}
    for key, parts in samples.items():
        a = torch.cat(parts)
        if a.numel() > max_samples:
            a = a[torch.randperm(a.numel(), generator=gen)[:max_samples]]
        v = a.sort().values
        n = v.numel()
        tables[key] = [0.0] + [float(v[min(n - 1, round(i / levels * n))])
                               for i in range(1, levels + 1)]
    order = {k: i for i, k in enumerate(PROJECTION_KINDS)}
    tables = dict(sorted(tables.items(), key=lambda kv: (int(kv[0].split("/")[0][5:]),
                                                         order[kv[0].split("/")[1]])))
    return {"method": Threshold.name, "levels": levels, "tokens": tokens, "thresholds": tables}


__all__ = ["LEVELS", "Threshold", "calibrate", "threshold_at"]
