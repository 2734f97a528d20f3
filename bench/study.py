#!/usr/bin/env python
"""The paper's comparisons at CPU scale: same model, data and token budget for every variant.

Variants: dense; Q-Sparse top-K + STE at S = 0.4 and 0.6; top-K without STE (S = 0.6); the ReLU
sparsifier; Block 2:4; BitNet b1.58 dense and with Q-Sparse (S = 0.6). Each is trained with
`pretrain_qsparse.py` on the bundled corpus (preprocessed like `make demo`) with ``--seeds``
seeds (``--seed 1234 + k``: the initialisation and the data order change), at the demo size
(examples/configs/demo_tiny.yaml: 4 x 128) and, for the variants of ``--wide-variants``, at width
256 (4 x 256, 4 heads / 2 KV groups), so the dense-vs-sparse gap is measured at two sizes. Runs
are resumable (``bench/runlib.py``: finished runs are skipped). It writes into ``--out``:

  results.md          per size: final train/valid loss as mean ± std over the seeds, the
                      difference from dense with its standard error and whether it exceeds
                      twice that, measured sparsity, activated parameters, tokens/s
  loss_curves.png     training loss of every variant (demo size, first seed)
  grad_norm_ste.png   gradient norm per layer and projection, STE vs no-STE (the paper's Fig. 2 idea)
  relu_density.png    measured density over training for the ReLU sparsifier vs top-K
  summary.json        every run's summary

Usage: ``python bench/study.py [--out bench/results/study] [--work build/study] [--seeds 3]
[--train-iters 300] [--sizes demo wide] [--only dense topk-0.4 ...]``
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics

import runlib

VARIANTS = {
    "dense": ["--qsparse-mode", "none"],
    "topk-0.4": ["--qsparse-mode", "topk", "--qsparse-ratio", "0.4"],
    "topk-0.6": ["--qsparse-mode", "topk", "--qsparse-ratio", "0.6"],
    "topk-0.6-no-ste": ["--qsparse-mode", "topk", "--qsparse-ratio", "0.6", "--no-ste"],
    "relu": ["--qsparse-mode", "relu"],
    "block-2:4": ["--qsparse-mode", "block", "--qsparse-block", "2:4"],
    "bitnet-dense": ["--qsparse-mode", "none", "--bitnet"],
    "bitnet-topk-0.6": ["--qsparse-mode", "topk", "--qsparse-ratio", "0.6", "--bitnet"],
}
# the model flags of each size on top of examples/configs/demo_tiny.yaml
SIZES = {"demo": [], "wide": ["--hidden-size", "256", "--num-attention-heads", "4",
                              "--num-query-groups", "2"]}
WIDE_VARIANTS = ("dense", "topk-0.4", "topk-0.6")
BASE_SEED = 1234


def run_variant(size: str, name: str, seed: int, data: str, work: str, args) -> dict:
    run_dir = os.path.join(work, "runs", size, name, f"seed{seed}")
    flags = ["--config", "examples/configs/demo_tiny.yaml", *SIZES[size], "--data-path", data,
             "--data-cache-path", os.path.join(work, "cache"),
             "--train-iters", str(args.train_iters), "--eval-interval", str(args.train_iters),
             "--lr-warmup-iters", str(max(1, args.train_iters // 10)),
             "--eval-iters", "16", "--log-interval", "10", "--log-sparsity-per-layer",
             "--seed", str(BASE_SEED + seed), *VARIANTS[name]]
    summary = runlib.train(run_dir, flags, save_interval=100)
    summary["scalars_dir"] = os.path.join(run_dir, "tb")
    return summary


def sparsity_of(summary: dict) -> float:
    d = summary.get("density") or {}
    return 1.0 - sum(d.values()) / len(d) if d else 0.0


def mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def size_table(size: str, runs: dict[str, list[dict]]) -> str:
    """One size: every variant's losses as mean ± std over seeds, and its gap to dense."""
    lines = ["| variant | seeds | train loss | valid loss | valid − dense | exceeds 2 s.e.? | "
             "measured sparsity | activated / non-embedding params | tokens/s |",
             "|---|---:|---|---|---|---|---:|---|---:|"]
    dense = [r["valid_loss"] for r in runs.get("dense", [])]
    for name, rs in runs.items():
        tr, va = mean_std([r["train_loss"] for r in rs]), mean_std([r["valid_loss"] for r in rs])
        gap, verdict = "–", "–"
        if name != "dense" and len(dense) > 1 and len(rs) > 1:
            d_mean, d_std = mean_std(dense)
            se = math.sqrt(va[1] ** 2 / len(rs) + d_std ** 2 / len(dense))
            diff = va[0] - d_mean
            gap = f"{diff:+.4f} ± {se:.4f}"
            verdict = "yes" if abs(diff) > 2 * se else "no"
        s0 = rs[0]
        lines.append(
            f"| {name} | {len(rs)} | {tr[0]:.4f} ± {tr[1]:.4f} | {va[0]:.4f} ± {va[1]:.4f} | "
            f"{gap} | {verdict} | {sparsity_of(s0):.1%} | {s0.get('activated_params', 0):,.0f} / "
            f"{s0['non_embedding_parameters']:,} | "
            f"{statistics.fmean(r['tokens_per_sec'] for r in rs):,.0f} |")
    return "\n".join(lines) + "\n"


def write_table(results: dict, path: str, args) -> str:
    """``results[size][variant]`` = the runs over seeds."""
    parts = [f"Study: {args.train_iters} steps x 16 x 128 tokens per run, the same data and "
             f"schedule for every variant, seeds {BASE_SEED}..{BASE_SEED + args.seeds - 1} "
             "(initialisation and data order); mean ± sample std over the seeds. "
             "'valid − dense': difference of the means ± its standard error; 'exceeds': whether "
             "it is larger than twice that.\n"]
    for size, runs in results.items():
        layout = "4 x 128 (examples/configs/demo_tiny.yaml)" if size == "demo" else \
            "4 x 256, 4 heads / 2 KV groups"
        parts.append(f"\n**{size}**: {layout}\n\n" + size_table(size, runs))
    text = "".join(parts)
    runlib.write_text(path, text)
    return text


def plots(results: dict, out: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name, s in results.items():
        steps, vals = zip(*s["scalars"]["lm-loss"])
        ax.plot(steps, vals, label=name)
    ax.set_xlabel("iteration")
    ax.set_ylabel("training loss")
    ax.set_ylim(top=min(8.5, ax.get_ylim()[1]))
    ax.legend(fontsize=8)
    ax.set_title("training loss, same data and tokens")
    fig.tight_layout()
    runlib.save_fig(fig, os.path.join(out, "loss_curves.png"))
    plt.close(fig)

    pair = [n for n in ("topk-0.6", "topk-0.6-no-ste") if n in results]
    if len(pair) == 2:
        fig, axes = plt.subplots(1, 4, figsize=(14, 3.8), sharey=False)
        kinds = ("qkv", "o", "gate_up", "down")
        for ax, kind in zip(axes, kinds):
            for name, style in zip(pair, ("-o", "--s")):
                sc = results[name]["scalars"]
                layers = sorted(int(t.split("/")[1][5:]) for t in sc
                                if t.startswith("grad-norm/layer") and t.endswith("/" + kind))
                means = [sum(v for _, v in sc[f"grad-norm/layer{i}/{kind}"]) /
                         len(sc[f"grad-norm/layer{i}/{kind}"]) for i in layers]
                ax.plot(layers, means, style, label=name)
            ax.set_title(f"{kind}: mean grad norm")
            ax.set_xlabel("layer")
            ax.set_yscale("log")
        axes[0].legend(fontsize=8)
        fig.tight_layout()
        runlib.save_fig(fig, os.path.join(out, "grad_norm_ste.png"))
        plt.close(fig)

    if "relu" in results:
        fig, ax = plt.subplots(figsize=(7, 4.5))
        for name, style in (("relu", "-"), ("topk-0.6", "--")):
            if name not in results:
                continue
            sc = results[name]["scalars"]
            for j, kind in enumerate(("qkv", "o", "gate_up", "down")):
                tag = f"density/kind/{kind}"
                if tag in sc:
                    steps, vals = zip(*sc[tag])
                    ax.plot(steps, [1 - v for v in vals], style, color=f"C{j}",
                            label=f"{name} {kind}")
        ax.set_xlabel("iteration")
        ax.set_ylabel("measured sparsity (1 - density)")
        ax.legend(fontsize=7, ncol=2)
        ax.set_title("sparsity during training: ReLU drifts, top-K is fixed")
        fig.tight_layout()
        runlib.save_fig(fig, os.path.join(out, "relu_density.png"))
        plt.close(fig)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="bench/results/study", help="Results folder.")
    p.add_argument("--work", default="build/study", help="Runs, data and checkpoints.")
    p.add_argument("--train-iters", type=int, default=300, help="Steps per run.")
    p.add_argument("--seeds", type=int, default=3, help="Seeds per variant.")
    p.add_argument("--sizes", nargs="+", default=list(SIZES), choices=list(SIZES))
    p.add_argument("--only", nargs="+", choices=list(VARIANTS),
                   help="Run only these variants (at the demo size).")
    p.add_argument("--wide-variants", nargs="+", choices=list(VARIANTS),
                   default=list(WIDE_VARIANTS), help="Variants also run at width 256.")
    args = p.parse_args()
    out, work = os.path.abspath(args.out), os.path.abspath(args.work)
    data = runlib.prepare_data(work)
    plan = {"demo": args.only or list(VARIANTS), "wide": args.wide_variants}
    results: dict = {}
    for size in args.sizes:
        print(f"{size}: {len(plan[size])} variants x {args.seeds} seeds, "
              f"{args.train_iters} steps each -> {work}/runs/{size}", flush=True)
        for seed in range(args.seeds):  # seed-major: a partial study has every variant once
            for name in plan[size]:
                run = run_variant(size, name, seed, data, work, args)
                results.setdefault(size, {}).setdefault(name, []).append(run)
    table = write_table(results, os.path.join(out, "results.md"), args)
    if "demo" in results:
        first = {n: dict(rs[0], scalars=runlib.read_scalars(rs[0]["scalars_dir"]))
                 for n, rs in results["demo"].items()}
        plots(first, out)
    runlib.write_text(os.path.join(out, "summary.json"), json.dumps(
        {size: {n: [{k: v for k, v in r.items() if k != "scalars_dir"} for r in rs]
                for n, rs in runs.items()} for size, runs in results.items()}, indent=1))
    print()
    print(table)


if __name__ == "__main__":
    main()
