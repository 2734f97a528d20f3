#!/usr/bin/env python
"""The Q-Sparse scaling law from our own runs: a grid of trainings, the fit, S* and its plots.

The grid (every run through ``pretrain_qsparse.py`` on the bundled corpus, preprocessed like
``make demo``; same data order, seed and schedule shape for every run):

* model sizes (``--sizes``): LLaMA-style blocks with the relu2_glu FFN, the 4k SentencePiece
  vocabulary and tied embeddings, from 2 x 64 to 5 x 160 (layers x width): 0.10M to 1.38M
  non-embedding parameters, a 14x span;
* sparsities (``--sparsities``): 0 (the dense model), 0.3, 0.45, 0.6, 0.7, 0.8, top-K with STE on
  every projection's input;
* precisions (``--precisions``): full precision and BitNet b1.58 (ternary weights, int8
  activations);
* token budget: ``D(N) = 800k * (N / N_xs)^0.25`` tokens, rounded up to whole steps of
  16 x 128 tokens (xs 0.80M, s 1.05M, m 1.35M, l 1.55M: 0.8 to 1.6 passes over the corpus's
  ~960k training tokens; fewer tokens leave the small models in the early loss plateau, where
  the runs differ by how fast they leave it rather than by what they can learn); learning rate
  3e-3 with 10% warm-up and cosine decay to 3e-4 over the run;
* validation loss at the end over 24 x 16 sequences of 128 tokens of the 5% held-out documents.

Runs are resumable (``bench/runlib.py``): a finished run is skipped and a run killed mid-way resumes
from its last checkpoint, so the grid can be run over several sittings (``--max-runs`` stops after
that many new runs). Once every run of a precision is in, it collects the runs with
``tools/scaling_law.py runs``, fits ``L(N, S) = E + (B + C exp(beta / (1 - S))) / N^alpha``
(``fit``, bootstrap intervals, S* and N / N_a with intervals) and writes into ``--out``:

  runs.csv          one line per run: params, sparsity, loss, bits, size, tokens, train loss, wall
  fit.json          the parameters, their 95% intervals, S* and N / N_a with intervals
  fit.txt           what ``scaling_law.py fit`` printed
  loss_vs_n.png     loss vs N for each S with the fitted curves (the paper's Fig. 3 / 4 shape)
  loss_vs_s.png     loss vs S at a fixed number of activated parameters, S* marked (Fig. 5 shape)
  results.md        the grid as tables and the fit, ready for the README

Usage: ``python bench/scaling_study.py [--work build/scaling] [--out bench/results/scaling]
[--max-runs N] [--fit-only] [--list]``.
"""

from __future__ import annotations

import argparse
import csv
import io
import math
import os
import subprocess
import sys

import runlib

# name: (layers, hidden, heads, query groups)
SIZES = {"xs": (2, 64, 2, 1), "s": (3, 96, 3, 1), "m": (4, 128, 4, 2), "l": (5, 160, 5, 1)}
SPARSITIES = (0.0, 0.3, 0.45, 0.6, 0.7, 0.8)
PRECISIONS = ("fp", "bitnet")
MICRO_BATCH, SEQ = 16, 128
BASE_TOKENS, TOKEN_EXPONENT = 800_000, 0.25


def non_embedding_params(layers: int, hidden: int, heads: int, groups: int) -> int:
    """Non-embedding parameters of one size (GLU FFN at 8/3 x hidden rounded up to 64, RMSNorm)."""
    ffn = math.ceil(8 * hidden / 3 / 64) * 64
    kv = 2 * hidden * (hidden // heads) * groups
    per_layer = 2 * hidden * hidden + kv + 3 * hidden * ffn + 2 * hidden
    return layers * per_layer + hidden


def token_budget(n: int) -> int:
    n0 = non_embedding_params(*SIZES["xs"])
    step = MICRO_BATCH * SEQ
    return math.ceil(BASE_TOKENS * (n / n0) ** TOKEN_EXPONENT / step) * step


def grid(sizes, sparsities, precisions):
    for prec in precisions:
        for size in sizes:
            for s in sparsities:
                yield prec, size, s


def iterations(size: str) -> int:
    return token_budget(non_embedding_params(*SIZES[size])) // (MICRO_BATCH * SEQ)


def run_dir(work: str, prec: str, size: str, s: float) -> str:
    """Named by its steps too, so a changed budget rule never reuses a stale run."""
    return os.path.join(work, "runs", prec, size, f"S{s:g}-{iterations(size)}it")


def flags(data: str, work: str, prec: str, size: str, s: float) -> list[str]:
    layers, hidden, heads, groups = SIZES[size]
    iters = iterations(size)
    sparsity = ["--qsparse-mode", "none"] if s == 0 else ["--qsparse-mode", "topk",
                                                          "--qsparse-ratio", f"{s:g}"]
    return ["--config", "examples/configs/demo_tiny.yaml", "--data-path", data,
            "--data-cache-path", os.path.join(work, "cache"), "--split", "95,5,0",
            "--num-layers", str(layers), "--hidden-size", str(hidden),
            "--num-attention-heads", str(heads), "--num-query-groups", str(groups),
            "--micro-batch-size", str(MICRO_BATCH), "--seq-length", str(SEQ),
            "--train-iters", str(iters), "--lr", "3e-3", "--min-lr", "3e-4",
            "--lr-warmup-iters", str(max(1, iters // 10)), "--lr-decay-style", "cosine",
            "--eval-interval", str(iters), "--eval-iters", "24", "--log-interval", "10",
            "--seed", "1234", *sparsity, *(["--bitnet"] if prec == "bitnet" else [])]


def collect(work: str, out: str, sizes, sparsities, precisions) -> list[dict]:
    """One row per finished run of the grid (in grid order)."""
    rows = []
    for prec, size, s in grid(sizes, sparsities, precisions):
        summary = runlib.finished(run_dir(work, prec, size, s))
        if summary is None:
            continue
        rows.append({"params": summary["non_embedding_parameters"], "sparsity": s,
                     "loss": summary["valid_loss"], "bits": summary.get("bits", 16),
                     "size": size, "precision": prec,
                     "tokens": summary["iterations"] * MICRO_BATCH * SEQ,
                     "train_loss": summary.get("train_loss"),
                     "tokens_per_sec": summary.get("tokens_per_sec")})
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=list(rows[0]) if rows else ["params"])
    w.writeheader()
    w.writerows(rows)
    runlib.write_text(os.path.join(out, "runs.csv"), buf.getvalue())
    return rows


def fit(out: str, bootstrap: int) -> str:
    # paths relative to the checkout when inside it, so fit.txt names the repo's own files
    rel = os.path.relpath(out, runlib.ROOT)
    where = out if rel.startswith("..") else rel
    cmd = [sys.executable, "tools/scaling_law.py", "fit", "--csv", os.path.join(where, "runs.csv"),
           "--bootstrap", str(bootstrap), "--plot", os.path.join(where, "loss_vs_n.png"),
           "--plot-optimum", os.path.join(where, "loss_vs_s.png"),
           "--output", os.path.join(where, "fit.json")]
    proc = subprocess.run(cmd, cwd=runlib.ROOT, capture_output=True, text=True)
    text = proc.stdout + proc.stderr
    if proc.returncode != 0:
        raise SystemExit(f"scaling_law.py fit failed:\n{text}")
    runlib.write_text(os.path.join(out, "fit.txt"), text)
    return text


def tables(rows: list[dict], sizes, sparsities) -> str:
    out = []
    for prec in dict.fromkeys(r["precision"] for r in rows):
        by = {(r["size"], r["sparsity"]): r for r in rows if r["precision"] == prec}
        out.append(f"**{'BitNet b1.58' if prec == 'bitnet' else 'full precision'}**: "
                   "validation loss\n")
        out.append("| size | N (non-emb.) | tokens | " + " | ".join(f"S = {s:g}" for s in sparsities)
                   + " |")
        out.append("|---|---:|---:|" + "---:|" * len(sparsities))
        for size in sizes:
            n = non_embedding_params(*SIZES[size])
            cells = [f"{by[(size, s)]['loss']:.4f}" if (size, s) in by else "–" for s in sparsities]
            out.append(f"| {size} {SIZES[size][0]}x{SIZES[size][1]} | {n:,} | "
                       f"{token_budget(n):,} | " + " | ".join(cells) + " |")
        out.append("")
    return "\n".join(out)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="\n".join(__doc__.splitlines()[2:]))
    p.add_argument("--work", default="build/scaling", help="Runs, data and checkpoints.")
    p.add_argument("--out", default="bench/results/scaling", help="Committed results folder.")
    p.add_argument("--sizes", nargs="+", default=list(SIZES), choices=list(SIZES))
    p.add_argument("--sparsities", nargs="+", type=float, default=list(SPARSITIES))
    p.add_argument("--precisions", nargs="+", default=list(PRECISIONS), choices=PRECISIONS)
    p.add_argument("--max-runs", type=int, help="Stop after this many new runs (resume later).")
    p.add_argument("--fit-only", action="store_true", help="Collect and fit the finished runs.")
    p.add_argument("--bootstrap", type=int, default=200, help="Bootstrap refits of the fit.")
    p.add_argument("--list", action="store_true", help="Print the grid and its state, then exit.")
    args = p.parse_args()
    work, out = os.path.abspath(args.work), os.path.abspath(args.out)
    cells = list(grid(args.sizes, args.sparsities, args.precisions))
    if args.list:
        for prec, size, s in cells:
            n = non_embedding_params(*SIZES[size])
            state = "done" if runlib.finished(run_dir(work, prec, size, s)) else "todo"
            print(f"{prec:<7} {size:<3} N={n:>9,} S={s:<5g} tokens={token_budget(n):>9,}  {state}")
        return
    if not args.fit_only:
        data = runlib.prepare_data(work)
        todo = [c for c in cells if runlib.finished(run_dir(work, *c)) is None]
        print(f"{len(cells) - len(todo)} of {len(cells)} runs finished; training "
              f"{min(len(todo), args.max_runs or len(todo))} now -> {work}/runs", flush=True)
        for i, (prec, size, s) in enumerate(todo):
            if args.max_runs is not None and i >= args.max_runs:
                print("stopping at --max-runs; run again to continue")
                return
            runlib.train(run_dir(work, prec, size, s), flags(data, work, prec, size, s),
                         save_interval=50)
    rows = collect(work, out, args.sizes, args.sparsities, args.precisions)
    text = tables(rows, args.sizes, args.sparsities)
    fit_text = fit(out, args.bootstrap)
    runlib.write_text(os.path.join(out, "results.md"),
                      f"Command: `python bench/scaling_study.py`\n\n{text}\n```\n{fit_text}```\n")
    print(text)
    print(fit_text)


if __name__ == "__main__":
    main()
