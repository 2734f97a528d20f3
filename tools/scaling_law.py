#!/usr/bin/env python
"""Q-Sparse scaling law: fit it to runs, find the inference-optimal sparsity, collect runs.

The law (Q-Sparse, Sec. 3): ``L(N, S) = E + A(S) / N^alpha`` with ``A(S) = B + C * exp(beta / (1 - S))``
for model size ``N`` (non-embedding parameters) and sparsity ratio ``S``.

  fit      CSV of runs (columns params,sparsity,loss[,bits]) -> parameters with bootstrap
           confidence intervals, residuals, and a PNG of the fitted curves over the points.
           Minimises the Huber loss (delta 1e-3) between predicted and observed log-loss with
           L-BFGS from the best points of a grid of initialisations (one fit per `bits`).
  optimum  the sparsity S* minimising the loss at a fixed number of activated parameters
           N_a = (1 - S) N; S* does not depend on N_a or E. Prints S* and N / N_a, plots L(S).
  runs     collect the final validation losses of a directory of our training runs (each with the
           summary JSON written by `pretrain_qsparse.py --summary-json`) into such a CSV.

Examples:
  python tools/scaling_law.py runs --dir runs/ --output runs.csv
  python tools/scaling_law.py fit --csv runs.csv --plot fit.png
  python tools/scaling_law.py optimum --alpha 0.3 --B 50 --C 2 --beta 0.5 --plot optimum.png
"""

from __future__ import annotations

import argparse
import csv
import glob
import itertools
import json
import math
import os
import sys
from dataclasses import dataclass

# L-BFGS-B calls BLAS on 5-vectors: OpenBLAS's helper threads only spin against each other, and
# beside a busy core (a training run) every call waits for a descheduled one (measured: a grid fit
# 54 s instead of 0.7 s). One BLAS thread, unless the caller chose otherwise; set before numpy loads.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import numpy as np

PARAM_NAMES = ("E", "B", "C", "alpha", "beta")
HUBER_DELTA = 1e-3
GRID_STARTS = 8  # L-BFGS runs from the best of the 243 grid points
E_FLOOR = 1e-9  # the fitted E is kept at or above this fraction of the lowest loss
E_ZERO = 1e-3  # a fitted E below this fraction of the lowest loss is taken as E -> 0


class CSVError(ValueError):
    """A malformed runs CSV; the message names the file, the line and the fix."""


@dataclass
class Law:
    """Parameters of ``L(N, S) = E + (B + C exp(beta / (1 - S))) / N^alpha``."""

    E: float
    B: float
    C: float
    alpha: float
    beta: float

    def loss(self, n, s):
        n, s = np.asarray(n, dtype=np.float64), np.asarray(s, dtype=np.float64)
        return self.E + (self.B + self.C * np.exp(self.beta / (1.0 - s))) / n ** self.alpha

    def as_dict(self) -> dict:
        return {k: getattr(self, k) for k in PARAM_NAMES}


# ---------------------------------------------------------------------------------------------
# reading runs


def read_runs(path: str) -> dict[float, np.ndarray]:
    """Rows ``(N, S, L)`` grouped by bits (16 when the column is absent)."""
    if not os.path.isfile(path):
        raise CSVError(f"{path}: file not found; give the CSV written by `scaling_law.py runs`")
    aliases = {"params": "params", "n": "params", "sparsity": "sparsity", "s": "sparsity",
               "loss": "loss", "l": "loss", "bits": "bits"}
    groups: dict[float, list] = {}
    with open(path, newline="") as fh:
        reader = csv.reader(fh)
        header = next(reader, None)
        if header is None:
            raise CSVError(f"{path}: empty file; expected a header params,sparsity,loss[,bits]")
        cols = [aliases.get(h.strip().lower()) for h in header]
        for need in ("params", "sparsity", "loss"):
            if need not in cols:
                raise CSVError(f"{path}:1: no '{need}' column in header {header}; expected "
                               "params,sparsity,loss[,bits]")
        idx = {c: cols.index(c) for c in ("params", "sparsity", "loss", "bits") if c in cols}
        for lineno, row in enumerate(reader, start=2):
            if not row or all(not c.strip() for c in row):
                continue
            if len(row) < len(header):
                raise CSVError(f"{path}:{lineno}: {len(row)} fields, header has {len(header)}")
            vals = {}
            for c, i in idx.items():
                try:
                    vals[c] = float(row[i])
                except ValueError:
                    raise CSVError(f"{path}:{lineno}: {c} {row[i]!r} is not a number") from None
                if not math.isfinite(vals[c]):
                    raise CSVError(f"{path}:{lineno}: {c} is {row[i]}; use finite numbers")
            if vals["params"] <= 0:
                raise CSVError(f"{path}:{lineno}: params must be positive, got {row[idx['params']]}")
            if not 0.0 <= vals["sparsity"] < 1.0:
                raise CSVError(f"{path}:{lineno}: sparsity {vals['sparsity']} is outside [0, 1)")
            if vals["loss"] <= 0:
                raise CSVError(f"{path}:{lineno}: loss must be positive, got {row[idx['loss']]}")
            groups.setdefault(vals.get("bits", 16.0), []).append(
                (vals["params"], vals["sparsity"], vals["loss"]))
    if not groups:
        raise CSVError(f"{path}: no data rows")
    return {b: np.array(rows, dtype=np.float64) for b, rows in groups.items()}


# ---------------------------------------------------------------------------------------------
# fitting


def _unpack(theta: np.ndarray) -> Law:
    e, b, c, alpha, beta = theta
    return Law(E=math.exp(e), B=math.exp(b), C=math.exp(c), alpha=alpha, beta=beta)


def _objective(theta: np.ndarray, log_n, s, log_l) -> tuple[float, np.ndarray]:
    """Huber loss of log-loss residuals, and its gradient (parameters e, b, c = log E, B, C)."""
    e, b, c, alpha, beta = theta
    with np.errstate(over="ignore", invalid="ignore"):
        expo = np.exp(beta / (1.0 - s))
        a = np.exp(b) + np.exp(c) * expo
        na = np.exp(-alpha * log_n)
        pred_l = np.exp(e) + a * na
        r = np.log(pred_l) - log_l
    if not np.all(np.isfinite(r)):
        return 1e30, np.zeros_like(theta)
    absr = np.abs(r)
    huber = np.where(absr <= HUBER_DELTA, 0.5 * r * r, HUBER_DELTA * (absr - 0.5 * HUBER_DELTA))
    dh = np.clip(r, -HUBER_DELTA, HUBER_DELTA)  # d huber / d r
    g = dh / pred_l  # d / d pred_l
    grad = np.array([
        np.sum(g * np.exp(e)),
        np.sum(g * np.exp(b) * na),
        np.sum(g * np.exp(c) * expo * na),
        np.sum(g * a * na * -log_n),
        np.sum(g * np.exp(c) * expo / (1.0 - s) * na),
    ])
    return float(np.sum(huber)), grad


def _init_grid(log_l_min: float):
    es = [log_l_min - d for d in (0.05, 0.5, 1.5)]
    return itertools.product(es, (0.0, 5.0, 10.0), (-5.0, 0.0, 5.0), (0.1, 0.3, 0.6),
                             (0.1, 0.5, 1.0))


def fit_law(rows: np.ndarray, init: np.ndarray | None = None) -> tuple[Law, float]:
    """Best fit over the initialisation grid (or from ``init``); returns (law, objective)."""
    from scipy.optimize import minimize

    if len(rows) < len(PARAM_NAMES) + 1:
        raise CSVError(f"{len(rows)} runs cannot determine {len(PARAM_NAMES)} parameters; give "
                       f"at least {len(PARAM_NAMES) + 1} (several sizes and sparsities)")
    log_n, s, log_l = np.log(rows[:, 0]), rows[:, 1], np.log(rows[:, 2])
    if init is not None:
        starts = [init]
    else:  # L-BFGS from the most promising points of the grid
        grid = [np.array(t) for t in _init_grid(log_l.min())]
        scores = [_objective(t, log_n, s, log_l)[0] for t in grid]
        starts = [grid[i] for i in np.argsort(scores)[:GRID_STARTS]]
    # E between 1e-9 x and 1 x the lowest loss: below, it is indistinguishable from 0 (see
    # e_at_zero) and an unbounded log E would only crawl towards -inf until maxiter
    bounds = [(log_l.min() + math.log(E_FLOOR), log_l.min())] + [(None, None)] * 4
    best, best_val = None, math.inf
    for theta0 in starts:
        theta0 = np.array(theta0, dtype=np.float64)
        theta0[0] = np.clip(theta0[0], *bounds[0])
        res = minimize(_objective, theta0, args=(log_n, s, log_l), jac=True, method="L-BFGS-B",
                       bounds=bounds, options={"maxiter": 2000, "ftol": 1e-15, "gtol": 1e-12})
        if res.fun < best_val:
            best, best_val = res.x, float(res.fun)
    return _unpack(best), best_val


def bootstrap(rows: np.ndarray, law: Law, samples: int, seed: int) -> list[Law]:
    """Refits on resampled runs (warm-started from ``law``); resamples with too few distinct
    runs to identify the parameters are left out."""
    rng = np.random.default_rng(seed)
    theta = np.array([math.log(law.E), math.log(law.B), math.log(law.C), law.alpha, law.beta])
    draws = []
    for _ in range(samples):
        pick = rows[rng.integers(0, len(rows), len(rows))]
        if len(np.unique(pick[:, :2], axis=0)) < len(PARAM_NAMES) + 1:
            continue  # too few distinct runs in this resample to identify the parameters
        draws.append(fit_law(pick, init=theta)[0])
    return draws


def intervals(draws: list[Law]) -> dict[str, tuple]:
    """95% percentile intervals of each parameter, of S* and of N / N_a over bootstrap draws."""
    if not draws:
        return {}
    values = {k: [getattr(d, k) for d in draws] for k in PARAM_NAMES}
    values["S*"] = [optimal_sparsity(d) for d in draws]
    ci = {k: (float(np.percentile(v, 2.5)), float(np.percentile(v, 97.5)))
          for k, v in values.items()}
    ci["N/N_a"] = tuple(1.0 / (1.0 - s) for s in ci["S*"])  # monotone in S*
    return ci


# ---------------------------------------------------------------------------------------------
# optimum


def _reduced_loss(law: Law, s):
    """(L - E) * N_a^alpha at fixed activated parameters: ``A(S) (1 - S)^alpha``."""
    s = np.asarray(s, dtype=np.float64)
    with np.errstate(over="ignore"):
        return (law.B + law.C * np.exp(law.beta / (1.0 - s))) * (1.0 - s) ** law.alpha


def optimal_sparsity(law: Law) -> float:
    """S* in [0, 1) minimising the loss at a fixed number of activated parameters."""
    from scipy.optimize import minimize_scalar

    grid = np.linspace(0.0, 0.999, 2000)
    vals = _reduced_loss(law, grid)
    i = int(np.nanargmin(vals))
    lo, hi = grid[max(0, i - 1)], grid[min(len(grid) - 1, i + 1)]
    if hi <= lo:
        return float(grid[i])
    res = minimize_scalar(lambda x: float(_reduced_loss(law, x)), bounds=(lo, hi),
                          method="bounded", options={"xatol": 1e-10})
    return float(res.x) if res.fun <= vals[i] else float(grid[i])


# ---------------------------------------------------------------------------------------------
# plots


def _plot_fit(path: str, groups: dict, laws: dict) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(groups), figsize=(6 * len(groups), 4.5), squeeze=False)
    for ax, (bits, rows) in zip(axes[0], sorted(groups.items())):
        law = laws[bits]
        ns = np.geomspace(rows[:, 0].min() / 1.5, rows[:, 0].max() * 1.5, 100)
        for j, s in enumerate(sorted(set(rows[:, 1]))):
            sel = rows[:, 1] == s
            color = f"C{j}"
            ax.scatter(rows[sel, 0], rows[sel, 2], color=color, label=f"S = {s:g}")
            ax.plot(ns, law.loss(ns, s), color=color)
        ax.set_xscale("log")
        ax.set_xlabel("non-embedding parameters N")
        ax.set_ylabel("validation loss")
        ax.set_title(f"{bits:g}-bit weights: L = E + A(S)/N^α, α = {law.alpha:.3f}")
        ax.legend()
    fig.tight_layout()
    _save_fig(fig, path)


def _plot_optimum(path: str, law: Law, n_a: float, s_star: float) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    s = np.linspace(0.0, 0.95, 400)
    loss = law.E + _reduced_loss(law, s) / n_a ** law.alpha
    fig, ax = plt.subplots(figsize=(6, 4.5))
    ax.plot(s, loss)
    ax.axvline(s_star, color="k", ls="--", label=f"S* = {s_star:.2%}")
    ax.set_xlabel("sparsity ratio S")
    ax.set_ylabel("predicted loss")
    ax.set_title(f"loss at fixed activated parameters N_a = {n_a:.3g}")
    ax.legend()
    fig.tight_layout()
    _save_fig(fig, path)


def _plot_fit_optimum(path: str, groups: dict, laws: dict) -> float:
    """Loss vs S at one fixed number of activated parameters per precision, S* marked.

    N_a is the geometric mean of the runs' activated parameters ``(1 - S) N``. Each run is moved
    to that N_a along its fitted law, ``E + (L - E) (N_a,run / N_a)^alpha``, so the points show
    how far the runs themselves lie from the curve (they would sit on it if the law held)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    all_rows = np.concatenate(list(groups.values()))
    n_a = float(np.exp(np.mean(np.log((1.0 - all_rows[:, 1]) * all_rows[:, 0]))))
    s = np.linspace(0.0, 0.9, 400)
    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    for j, (bits, rows) in enumerate(sorted(groups.items())):
        law, color = laws[bits], f"C{j}"
        ax.plot(s, law.E + _reduced_loss(law, s) / n_a ** law.alpha, color=color,
                label=f"{bits:g}-bit fit")
        run_na = (1.0 - rows[:, 1]) * rows[:, 0]
        moved = law.E + (rows[:, 2] - law.E) * (run_na / n_a) ** law.alpha
        ax.scatter(rows[:, 1], moved, color=color, s=14, alpha=0.7)
        s_star = optimal_sparsity(law)
        ax.axvline(s_star, color=color, ls="--", label=f"{bits:g}-bit S* = {s_star:.1%}")
    ax.set_xlabel("sparsity ratio S")
    ax.set_ylabel("validation loss")
    ax.set_title(f"loss at fixed activated parameters N_a = {n_a:.3g}")
    ax.legend(fontsize=8)
    fig.tight_layout()
    _save_fig(fig, path)
    return n_a


def _save_fig(fig, path: str) -> None:
    from megatron_qsparse.atomic import save_png

    save_png(fig, path)


# ---------------------------------------------------------------------------------------------
# commands


# distinct model sizes (E vs alpha vs the N-scaled term) and sparsities (the constant vs C vs
# beta) a fit needs before each of its parameters is determined by the data
MIN_DISTINCT = 3


def check_identifiable(rows: np.ndarray, bits: float, path: str) -> None:
    """CSVError unless the runs of one precision span enough model sizes and sparsities."""
    if len(rows) < len(PARAM_NAMES) + 1:
        return  # fit_law says how many runs it needs
    for col, what, flag in ((0, "model sizes (params)", "alpha and E"),
                            (1, "sparsity ratios", "beta, B and C")):
        distinct = np.unique(rows[:, col]).size
        if distinct < MIN_DISTINCT:
            raise CSVError(f"{path}: the {bits:g}-bit runs have {distinct} distinct "
                           f"{what}, which cannot determine {flag}; add runs at "
                           f"{MIN_DISTINCT - distinct} or more other {what} (at least "
                           f"{MIN_DISTINCT})")


def _wide(ci: tuple, value: float) -> bool:
    """An interval wider than the value itself: the data hardly constrain the parameter."""
    return ci[1] - ci[0] > max(abs(value), 1e-12)


def e_at_zero(law: Law, rows: np.ndarray) -> bool:
    """The fitted irreducible loss went to its lower end (E -> 0): the runs are so far above the
    irreducible loss that a pure power law ``A(S) / N^alpha`` fits them as well, E is not
    identified, and its bootstrap interval (refits warm-started at E ~ 0) says nothing. The
    objective is flat in log E there, so where the optimizer stops between E_FLOOR and a few
    1e-5 of the loss depends on floating-point details: anything under E_ZERO of the lowest loss
    (no run's loss could tell it from 0) counts."""
    return law.E < E_ZERO * float(rows[:, 2].min())


def _print_fit(bits: float, rows: np.ndarray, law: Law, obj: float, ci: dict, args) -> tuple:
    """Print one precision's fit; returns (poorly determined parameters, residuals, S*)."""
    pred = law.loss(rows[:, 0], rows[:, 1])
    resid = np.log(pred) - np.log(rows[:, 2])
    print(f"\n{bits:g}-bit weights: {len(rows)} runs, Huber objective {obj:.3e}")
    print(f"  {'param':<6} {'value':>12}   95% bootstrap interval")
    wide = [k for k in PARAM_NAMES if k in ci and _wide(ci[k], getattr(law, k))]
    zero_e = e_at_zero(law, rows)
    for k in PARAM_NAMES:
        lo_hi = f"[{ci[k][0]:.4g}, {ci[k][1]:.4g}]" if k in ci else "n/a"
        flag = ("   WIDE: poorly determined" if k in wide else
                "   AT 0: not identified (pure power law fits)" if k == "E" and zero_e else "")
        print(f"  {k:<6} {getattr(law, k):>12.5g}   {lo_hi}{flag}")
    if args.bootstrap and not ci:
        print("  warning: no bootstrap resample had enough distinct runs; the intervals "
              "are unknown, add runs", file=sys.stderr)
    if zero_e:
        print("  warning: E went to 0: these losses are far above the irreducible loss, so the "
              "fit is a pure power law in N and E (and its interval) is not determined by them",
              file=sys.stderr)
    if wide:
        print(f"  warning: the 95% intervals of {', '.join(wide)} are wider than their "
              "values; these runs do not pin them down (add model sizes/sparsities)",
              file=sys.stderr)
    print(f"  log-loss residuals: max |r| {np.abs(resid).max():.2e}, "
          f"rms {np.sqrt(np.mean(resid ** 2)):.2e}")
    s_star = optimal_sparsity(law)
    s_ci = (f", 95% interval [{ci['S*'][0]:.2%}, {ci['S*'][1]:.2%}]" if "S*" in ci else "")
    n_ci = (f", 95% interval [{ci['N/N_a'][0]:.2f}, {ci['N/N_a'][1]:.2f}]" if "N/N_a" in ci
            else "")
    print(f"  inference-optimal sparsity S* = {s_star:.2%}{s_ci}")
    print(f"  model size at S*: N = {1 / (1 - s_star):.2f} x N_a{n_ci}")
    return wide, resid, s_star


def cmd_fit(args) -> int:
    groups = read_runs(args.csv)
    for bits, rows in sorted(groups.items()):
        check_identifiable(rows, bits, args.csv)
    laws, out = {}, {}
    for bits, rows in sorted(groups.items()):
        law, obj = fit_law(rows)
        laws[bits] = law
        ci = intervals(bootstrap(rows, law, args.bootstrap, args.seed)) if args.bootstrap else {}
        wide, resid, s_star = _print_fit(bits, rows, law, obj, ci, args)
        out[f"{bits:g}"] = {"params": law.as_dict(), "ci95": ci, "wide": wide,
                            "E_at_zero": e_at_zero(law, rows), "runs": len(rows),
                            "residuals": resid.tolist(), "optimal_sparsity": s_star,
                            "size_over_activated": 1.0 / (1.0 - s_star)}
    if args.plot:
        _plot_fit(args.plot, groups, laws)
        print(f"\nplot: {args.plot}")
    if args.plot_optimum:
        n_a = _plot_fit_optimum(args.plot_optimum, groups, laws)
        print(f"plot: {args.plot_optimum} (loss vs S at N_a = {n_a:.3g})")
    if args.output:
        from megatron_qsparse.atomic import write_text as atomic_write_text
        atomic_write_text(args.output, json.dumps(out, indent=1))
        print(f"parameters: {args.output}")
    return 0


def cmd_optimum(args) -> int:
    law = Law(E=args.E, B=args.B, C=args.C, alpha=args.alpha, beta=args.beta)
    s_star = optimal_sparsity(law)
    print(f"S* = {s_star:.4%}  (model size N = {1 / (1 - s_star):.3f} x activated N_a)")
    if args.plot:
        _plot_optimum(args.plot, law, args.activated_params, s_star)
        print(f"plot: {args.plot}")
    return 0


def cmd_runs(args) -> int:
    paths = sorted(glob.glob(os.path.join(args.dir, "**", args.summary_name), recursive=True))
    if not paths:
        raise CSVError(f"{args.dir}: no {args.summary_name} found; train with "
                       f"`pretrain_qsparse.py --summary-json DIR/RUN/{args.summary_name}`")
    rows, skipped = [], 0
    for p in paths:
        with open(p) as fh:
            s = json.load(fh)
        if s.get("valid_loss") is None or s.get("non_embedding_parameters") is None:
            print(f"skipping {p}: no validation loss or parameter count", file=sys.stderr)
            skipped += 1
            continue
        rows.append((s["non_embedding_parameters"], s.get("sparsity_ratio", 0.0),
                     s["valid_loss"], s.get("bits", 16), os.path.dirname(p)))
    from megatron_qsparse.atomic import write_text as atomic_write_text
    text = "params,sparsity,loss,bits,run\n" + "".join(
        f"{n},{sp},{loss},{b},{run}\n" for n, sp, loss, b, run in rows)
    atomic_write_text(args.output, text)
    print(f"{len(rows)} runs -> {args.output} ({skipped} skipped)")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="\n".join(__doc__.splitlines()[2:]))
    sub = p.add_subparsers(dest="command", required=True)
    f = sub.add_parser("fit", help="Fit the law to a CSV of runs.")
    f.add_argument("--csv", required=True, help="Runs: params,sparsity,loss[,bits] per line.")
    f.add_argument("--bootstrap", type=int, default=100, help="Bootstrap refits (0: none).")
    f.add_argument("--seed", type=int, default=0, help="Seed of the bootstrap resampling.")
    f.add_argument("--plot", help="Write the fitted curves over the points to this PNG.")
    f.add_argument("--plot-optimum", help="Write loss vs S at fixed activated parameters (runs "
                   "moved there along the fit, S* marked) to this PNG.")
    f.add_argument("--output", help="Write the parameters and intervals to this JSON.")
    o = sub.add_parser("optimum", help="Inference-optimal sparsity for given parameters.")
    o.add_argument("--alpha", type=float, required=True, help="Exponent of N.")
    o.add_argument("--B", type=float, required=True, help="Dense part of A(S).")
    o.add_argument("--C", type=float, required=True, help="Sparsity part of A(S).")
    o.add_argument("--beta", type=float, required=True, help="Exponent scale in A(S).")
    o.add_argument("--E", type=float, default=0.0, help="Irreducible loss (plot only).")
    o.add_argument("--activated-params", type=float, default=1e9,
                   help="N_a for the plot (S* does not depend on it).")
    o.add_argument("--plot", help="Write loss vs S at fixed N_a to this PNG.")
    r = sub.add_parser("runs", help="Collect a directory of training runs into a CSV.")
    r.add_argument("--dir", required=True, help="Folder searched recursively for summaries.")
    r.add_argument("--summary-name", default="summary.json", help="File name of the summaries.")
    r.add_argument("--output", required=True, help="CSV to write.")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return {"fit": cmd_fit, "optimum": cmd_optimum, "runs": cmd_runs}[args.command](args)
    except CSVError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
