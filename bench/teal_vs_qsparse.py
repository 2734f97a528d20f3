#!/usr/bin/env python
"""TEAL on the dense model vs Q-Sparse continue-trained, on the demo model, in one codebase.

1. trains the dense demo model (examples/configs/demo_tiny.yaml, --qsparse-mode none,
   --train-iters steps);
2. **TEAL**, training-free: tools/calibrate_thresholds.py on the training split, then the
   validation perplexity at each S (one calibration serves every S: --qsparse-ratio override);
3. **Q-Sparse**: continue-trains the dense model with top-K at each S for --continue-iters steps
   (--finetune, sparsity warm-up over the first third), and, for the same extra tokens, the dense
   model continued densely (the baseline the continued models are compared with);
4. prints a table of validation perplexity and measured density (tools/evaluate.py perplexity,
   sliding windows on the validation split) and writes it to --out/results.md.

Every step is skipped when its output exists, so the script resumes where it stopped.
Usage: ``python bench/teal_vs_qsparse.py [--out build/teal] [--sparsities 0.4 0.6]``
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = "examples/configs/demo_tiny.yaml"


def run(cmd: list[str], log: str) -> None:
    with open(log, "w") as fh:
        proc = subprocess.run([sys.executable, *cmd], cwd=ROOT, stdout=fh, stderr=subprocess.STDOUT)
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd[:2])} failed; see {log}")


def prepare_data(out: str) -> str:
    prefix = os.path.join(out, "data", "kjv")
    if not os.path.isfile(prefix + "_text_document.idx"):
        os.makedirs(os.path.dirname(prefix), exist_ok=True)
        run(["tools/preprocess_data.py", "--input", "examples/data/kjv_sample.jsonl",
             "--output-prefix", prefix, "--tokenizer-model", "examples/data/kjv_sp4k.model",
             "--append-eod", "--workers", "2"], prefix + ".log")
    return prefix + "_text_document"


def train(out: str, name: str, data: str, iters: int, extra: list[str]) -> str:
    save = os.path.join(out, name)
    if not os.path.isfile(os.path.join(save, "latest")):
        os.makedirs(out, exist_ok=True)
        run(["pretrain_qsparse.py", "--config", CONFIG, "--data-path", data,
             "--data-cache-path", os.path.join(out, "cache"), "--train-iters", str(iters),
             "--eval-interval", str(iters), "--eval-iters", "8", "--save", save,
             "--save-interval", str(iters), *extra], save + ".log")
        print(f"  trained {name}", flush=True)
    return save


def perplexity(out: str, name: str, ckpt: str, data: str, ratio: float | None = None) -> dict:
    path = os.path.join(out, f"ppl_{name}.json")
    if not os.path.isfile(path):
        run(["tools/evaluate.py", "perplexity", "--load", ckpt, "--data-path", data,
             "--split-name", "valid", "--stride", "64", "--json", path,
             *([] if ratio is None else ["--qsparse-ratio", str(ratio)])], path + ".log")
    with open(path) as fh:
        return json.load(fh)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[1])
    p.add_argument("--out", default="build/teal", help="Results folder.")
    p.add_argument("--train-iters", type=int, default=300, help="Steps of the dense model.")
    p.add_argument("--continue-iters", type=int, default=150,
                   help="Steps of continue-training (Q-Sparse, and the dense baseline).")
    p.add_argument("--sparsities", type=float, nargs="+", default=[0.4, 0.6])
    args = p.parse_args()
    out = os.path.abspath(args.out)
    data = prepare_data(out)
    cont = ["--load", None, "--finetune", "--lr", "1.0e-3", "--min-lr", "1.0e-4",
            "--lr-warmup-iters", "10"]

    def continued(extra):
        c = list(cont)
        c[1] = dense
        return c + extra

    dense = train(out, "dense", data, args.train_iters, ["--qsparse-mode", "none"])
    rows = [("dense", 0.0, dense, perplexity(out, "dense", dense, data))]
    teal = os.path.join(out, "dense_teal")
    if not os.path.isfile(os.path.join(teal, "latest")):
        run(["tools/calibrate_thresholds.py", "--load", dense, "--data-path", data,
             "--sparsity", str(args.sparsities[0]), "--save", teal], teal + ".log")
    for s in args.sparsities:
        rows.append(("TEAL (training-free)", s, teal, perplexity(out, f"teal_{s}", teal, data, s)))
    base = train(out, "dense_continued", data, args.continue_iters,
                 continued(["--qsparse-mode", "none"]))
    rows.append((f"dense, continued {args.continue_iters} steps", 0.0, base,
                 perplexity(out, "dense_continued", base, data)))
    for s in args.sparsities:
        ck = train(out, f"qsparse_{s}", data, args.continue_iters, continued(
            ["--qsparse-mode", "topk", "--qsparse-ratio", str(s),
             "--qsparse-warmup-iters", str(args.continue_iters // 3)]))
        rows.append((f"Q-Sparse top-K, continued {args.continue_iters} steps", s, ck,
                     perplexity(out, f"qsparse_{s}", ck, data)))

    lines = ["| model | S | valid perplexity | measured density (qkv / o / gate_up / down) |",
             "|---|---:|---:|---|"]
    for name, s, _, r in rows:
        d = r["density"]
        dens = " / ".join(f"{d.get(f'kind/{k}', float('nan')):.2f}"
                          for k in ("qkv", "o", "gate_up", "down"))
        lines.append(f"| {name} | {s:.1f} | {r['perplexity']:.2f} | {dens} |")
    table = "\n".join(lines) + "\n"
    header = (f"Demo model ({CONFIG}), dense for {args.train_iters} steps; validation split, "
              "sliding windows of 128 (stride 64).\n\n")
    from megatron_qsparse.atomic import write_text
    write_text(os.path.join(out, "results.md"), header + table)
    print(table)


if __name__ == "__main__":
    main()
