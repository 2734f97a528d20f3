#!/usr/bin/env python
"""The paper's comparisons at CPU scale: same model, data and token budget for every variant.

Variants: dense; Q-Sparse top-K + STE at S = 0.4 and 0.6; top-K without STE (S = 0.6); the ReLU
sparsifier; Block 2:4; BitNet b1.58 dense and with Q-Sparse (S = 0.6). Each is trained with
`pretrain_qsparse.py` on the bundled corpus (preprocessed like `make demo`), then the script writes
into ``--out``:

  results.md          table: final train/valid loss, measured sparsity, activated parameters, tokens/s
  loss_curves.png     training loss of every variant
  grad_norm_ste.png   gradient norm per layer and projection, STE vs no-STE (the paper's Fig. 2 idea)
  relu_density.png    measured density over training for the ReLU sparsifier vs top-K
  summary.json        everything above as numbers

Usage: ``python bench/study.py [--out build/study] [--train-iters 300] [--only dense topk-0.4 ...]``
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

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


def read_scalars(tb_dir: str) -> dict:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(tb_dir, size_guidance={"scalars": 0})
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def prepare_data(out: str, py: str) -> str:
    prefix = os.path.join(out, "data", "kjv")
    if not os.path.isfile(prefix + "_text_document.idx"):
        subprocess.run([py, "tools/preprocess_data.py", "--input", "examples/data/kjv_sample.jsonl",
                        "--output-prefix", prefix, "--tokenizer-model",
                        "examples/data/kjv_sp4k.model", "--append-eod", "--workers", "2"],
                       cwd=ROOT, check=True)
    return prefix + "_text_document"


def run_variant(name: str, extra: list[str], data: str, out: str, args, py: str) -> dict:
    run_dir = os.path.join(out, "runs", name)
    os.makedirs(run_dir, exist_ok=True)
    cmd = [py, "pretrain_qsparse.py", "--config", "examples/configs/demo_tiny.yaml",
           "--data-path", data, "--data-cache-path", os.path.join(out, "cache"),
           "--train-iters", str(args.train_iters), "--eval-interval", str(args.train_iters),
           "--eval-iters", "16", "--log-interval", "10", "--log-sparsity-per-layer",
           "--tensorboard-dir", os.path.join(run_dir, "tb"),
           "--summary-json", os.path.join(run_dir, "summary.json"), *extra]
    t = time.time()
    with open(os.path.join(run_dir, "log.txt"), "w") as log:
        proc = subprocess.run(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
    if proc.returncode != 0:
        raise SystemExit(f"variant {name} failed; see {run_dir}/log.txt")
    with open(os.path.join(run_dir, "summary.json")) as fh:
        summary = json.load(fh)
    summary["wall_s"] = time.time() - t
    summary["scalars"] = read_scalars(os.path.join(run_dir, "tb"))
    print(f"  {name:<18} valid {summary['valid_loss']:.4f}  ({summary['wall_s']:.0f} s)",
          flush=True)
    return summary


def sparsity_of(summary: dict) -> float:
    d = summary.get("density") or {}
    return 1.0 - sum(d.values()) / len(d) if d else 0.0


def write_table(results: dict, path: str, args) -> str:
    lines = [f"| variant | final train loss | final valid loss | measured sparsity | "
             f"activated params | tokens/s |", "|---|---|---|---|---|---|"]
    for name, s in results.items():
        lines.append(f"| {name} | {s['train_loss']:.4f} | {s['valid_loss']:.4f} | "
                     f"{sparsity_of(s):.1%} | {s.get('activated_params', 0):,.0f} / "
                     f"{s['non_embedding_parameters']:,} | {s['tokens_per_sec']:,.0f} |")
    text = "\n".join(lines) + "\n"
    header = (f"Study: demo model (examples/configs/demo_tiny.yaml), {args.train_iters} steps x "
              f"16 x 128 tokens each, same data order and seed.\n\n")
    from megatron_qsparse.training.checkpointing import atomic_write_text
    atomic_write_text(path, header + text)
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
    fig.savefig(os.path.join(out, "loss_curves.png"), dpi=110)
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
        fig.savefig(os.path.join(out, "grad_norm_ste.png"), dpi=110)
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
        fig.savefig(os.path.join(out, "relu_density.png"), dpi=110)
        plt.close(fig)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="build/study", help="Results folder.")
    p.add_argument("--train-iters", type=int, default=300, help="Steps per variant.")
    p.add_argument("--only", nargs="+", choices=list(VARIANTS), help="Run only these variants.")
    args = p.parse_args()
    py = sys.executable
    out = os.path.abspath(args.out)
    os.makedirs(out, exist_ok=True)
    data = prepare_data(out, py)
    names = args.only or list(VARIANTS)
    print(f"training {len(names)} variants for {args.train_iters} steps each -> {out}")
    results = {n: run_variant(n, VARIANTS[n], data, out, args, py) for n in names}
    table = write_table(results, os.path.join(out, "results.md"), args)
    plots(results, out)
    slim = {n: {k: v for k, v in s.items() if k != "scalars"} for n, s in results.items()}
    with open(os.path.join(out, "summary.json"), "w") as fh:
        json.dump(slim, fh, indent=1)
    print()
    print(table)


if __name__ == "__main__":
    main()
