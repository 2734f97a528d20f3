#!/usr/bin/env python
"""Continue-training and fine-tuning an off-the-shelf dense model into Q-Sparse, at CPU scale.

The paper's second and third settings (Sec. 4.2, 4.3): take a dense model trained without any
sparsity and continue-train it, or fine-tune it, with top-K on every projection's input, next to
the same model continued densely for the same tokens. Here:

* **the off-the-shelf model**: a LLaMA-style SwiGLU model of the demo shape (4 x 128, 4 heads /
  2 KV groups, tied embeddings, the 4k SentencePiece vocabulary) trained densely from scratch on
  the bundled corpus for ``--base-iters`` steps of 16 x 128 tokens (preprocessed like
  ``make demo``; 95/5 document split);
* **continue-training**: from its weights (``--load --finetune``: new optimizer and schedule),
  dense, top-K S = 0.4 and top-K S = 0.6 (the down projection's input included), each for each
  budget of ``--budgets`` steps, lr 1e-3 with 10% warm-up and cosine decay to 1e-4, the sparse
  runs with the sparsity ramped from 0 over the first quarter (``--qsparse-warmup-iters``); the
  validation loss at the end of every run;
* **fine-tuning**: the same three on a small instruction set this script generates from the corpus
  (public domain, like it): "which book is this passage from?" and "continue the passage", 4,000
  samples from random windows of the chapters, preprocessed with ``tools/preprocess_sft.py``
  (Alpaca template, loss on the responses only), for each budget of ``--sft-budgets`` steps at lr
  3e-4; the validation response loss at the end.

Every run is resumable (``bench/runlib.py``). It writes into ``--out``:

  results.md          both tables: validation loss per budget, and the gap to dense
  continue_gap.png    validation loss vs continue-training tokens, dense and sparse (Fig. 6 shape)
  sft_gap.png         the same for fine-tuning
  summary.json        every run's numbers

Usage: ``python bench/continue_study.py [--work build/continue] [--out bench/results/continue]
[--base-iters 400] [--budgets 50 100 200 400] [--sft-budgets 25 50 100 200]``.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys

import runlib

VARIANTS = {"dense": ["--qsparse-mode", "none"],
            "topk-0.4": ["--qsparse-mode", "topk", "--qsparse-ratio", "0.4"],
            "topk-0.6": ["--qsparse-mode", "topk", "--qsparse-ratio", "0.6"]}
MODEL = ["--config", "examples/configs/demo_tiny.yaml", "--ffn-type", "swiglu", "--split", "95,5,0",
         "--micro-batch-size", "16", "--seq-length", "128", "--log-interval", "10"]
TOKENS_PER_STEP = 16 * 128
SFT_SAMPLES = 4000


def schedule(iters: int) -> list[str]:
    return ["--train-iters", str(iters), "--lr-warmup-iters", str(max(1, iters // 10)),
            "--lr-decay-style", "cosine"]


def base_model(work: str, data: str, iters: int) -> str:
    """Train the dense off-the-shelf model once; returns its checkpoint folder."""
    run_dir = os.path.join(work, "base")
    runlib.train(run_dir, [*MODEL, "--data-path", data, "--data-cache-path",
                           os.path.join(work, "cache"), "--qsparse-mode", "none",
                           *schedule(iters), "--eval-interval", str(iters),
                           "--eval-iters", "24", "--seed", "1234"],
                 save_interval=100, keep_checkpoint=True)
    return os.path.join(run_dir, "ckpt")


def continued(work: str, kind: str, name: str, budget: int, base: str, data_flags: list[str],
              lr: float) -> dict:
    run_dir = os.path.join(work, kind, name, f"steps{budget}")
    sparse_warmup = [] if name == "dense" else ["--qsparse-warmup-iters", str(max(1, budget // 4))]
    return runlib.train(run_dir, [
        *MODEL, *data_flags, "--data-cache-path", os.path.join(work, "cache"),
        *VARIANTS[name], *sparse_warmup,
        *schedule(budget), "--lr", str(lr), "--min-lr", str(lr / 10),
        "--eval-interval", str(budget), "--eval-iters", "24", "--seed", "4321"],
        save_interval=max(25, budget // 2), init=base)


def instruction_set(path: str, seed: int = 0) -> None:
    """Generated fine-tuning samples from random passages of the corpus's chapters."""
    if os.path.isfile(path):
        return
    rng = random.Random(seed)
    chapters = []
    with open(os.path.join(runlib.ROOT, runlib.CORPUS)) as fh:
        for line in fh:
            doc = json.loads(line)
            chapters.append((doc["title"].rsplit(" ", 1)[0], doc["text"].split()))
    lines = []
    for _ in range(SFT_SAMPLES):
        book, words = rng.choice(chapters)
        n = rng.randint(12, 40)
        at = rng.randrange(0, max(1, len(words) - 2 * n))
        passage = " ".join(words[at:at + n])
        if rng.random() < 0.5:
            sample = {"input": f"Which book of the Bible is this passage from?\n\n{passage}",
                      "output": book}
        else:
            sample = {"input": f"Continue the passage:\n\n{passage}",
                      "output": " ".join(words[at + n:at + n + rng.randint(8, 24)])}
        lines.append(json.dumps(sample))
    runlib.write_text(path, "\n".join(lines) + "\n")


def sft_data(work: str) -> str:
    prefix = os.path.join(work, "data", "kjv_instruct")
    if not os.path.isfile(prefix + "_sft.idx"):
        jsonl = os.path.join(work, "data", "kjv_instruct.jsonl")
        instruction_set(jsonl)
        subprocess.run([sys.executable, "tools/preprocess_sft.py", "--input", jsonl,
                        "--output-prefix", prefix, "--tokenizer-model", runlib.TOKENIZER],
                       cwd=runlib.ROOT, check=True)
    return prefix + "_sft"


def table(results: dict, budgets: list[int], what: str) -> str:
    lines = [f"| {what} steps | tokens | " + " | ".join(VARIANTS) + " | "
             + " | ".join(f"{n} − dense" for n in VARIANTS if n != "dense") + " |",
             "|---:|---:|" + "---:|" * (2 * len(VARIANTS) - 1)]
    for b in budgets:
        row = {n: results[n][b]["valid_loss"] for n in VARIANTS}
        lines.append(f"| {b} | {b * TOKENS_PER_STEP:,} | "
                     + " | ".join(f"{row[n]:.4f}" for n in VARIANTS) + " | "
                     + " | ".join(f"{row[n] - row['dense']:+.4f}" for n in VARIANTS
                                  if n != "dense") + " |")
    return "\n".join(lines) + "\n"


def plot(results: dict, budgets: list[int], path: str, title: str, base_loss: float | None):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    tokens = [b * TOKENS_PER_STEP for b in budgets]
    for name, style in zip(VARIANTS, ("-o", "--s", ":^")):
        ax.plot(tokens, [results[name][b]["valid_loss"] for b in budgets], style, label=name)
    if base_loss is not None:
        ax.axhline(base_loss, color="gray", lw=0.8, label="off-the-shelf model, before")
    ax.set_xscale("log")
    ax.set_xlabel("tokens of continued training")
    ax.set_ylabel("validation loss")
    ax.set_title(title)
    ax.legend(fontsize=8)
    fig.tight_layout()
    runlib.save_fig(fig, path)
    plt.close(fig)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="\n".join(__doc__.splitlines()[2:]))
    p.add_argument("--work", default="build/continue", help="Runs, data and checkpoints.")
    p.add_argument("--out", default="bench/results/continue", help="Results folder.")
    p.add_argument("--base-iters", type=int, default=400, help="Steps of the dense base model.")
    p.add_argument("--budgets", nargs="+", type=int, default=[50, 100, 200, 400],
                   help="Continue-training steps.")
    p.add_argument("--sft-budgets", nargs="+", type=int, default=[25, 50, 100, 200],
                   help="Fine-tuning steps.")
    args = p.parse_args()
    work, out = os.path.abspath(args.work), os.path.abspath(args.out)
    data = runlib.prepare_data(work)
    base = base_model(work, data, args.base_iters)
    base_loss = runlib.finished(os.path.dirname(base))["valid_loss"]
    sft = sft_data(work)
    results: dict = {"continue": {}, "sft": {}}
    for b in args.budgets:  # budget-major: a partial study has every variant at small budgets
        for name in VARIANTS:
            results["continue"].setdefault(name, {})[b] = continued(
                work, "continue", name, b, base, ["--data-path", data], lr=1e-3)
    for b in args.sft_budgets:
        for name in VARIANTS:
            results["sft"].setdefault(name, {})[b] = continued(
                work, "sft", name, b, base, ["--data-format", "sft", "--data-path", sft], lr=3e-4)
    os.makedirs(out, exist_ok=True)
    cont = table(results["continue"], args.budgets, "continue")
    tune = table(results["sft"], args.sft_budgets, "fine-tune")
    text = (f"Command: `python bench/continue_study.py`\n\nOff-the-shelf dense SwiGLU model: "
            f"{args.base_iters} steps from scratch, validation loss {base_loss:.4f}.\n\n"
            f"**Continue-training** (validation loss of the corpus):\n\n{cont}\n"
            f"**Fine-tuning** on the generated instruction set (validation loss of the responses):"
            f"\n\n{tune}")
    runlib.write_text(os.path.join(out, "results.md"), text)
    plot(results["continue"], args.budgets, os.path.join(out, "continue_gap.png"),
         "continue-training a dense model into Q-Sparse", base_loss)
    plot(results["sft"], args.sft_budgets, os.path.join(out, "sft_gap.png"),
         "fine-tuning a dense model with Q-Sparse", None)
    runlib.write_text(os.path.join(out, "summary.json"), json.dumps(
        {k: {n: {str(b): r for b, r in v.items()} for n, v in res.items()}
         for k, res in results.items()}, indent=1))
    print(text)


if __name__ == "__main__":
    main()
