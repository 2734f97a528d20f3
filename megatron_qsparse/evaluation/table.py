"""The paper's results table from ``examples/eval_paper_suite.sh`` output folders.

Rows are runs (dense, Q-Sparse at some S, ...), columns the activated parameters and the five
tasks of the paper with the metric the Open LLM Leaderboard (v1) reports for each, then the
average, in percent. Each run folder holds, per task, lm_eval's ``results_*.json`` (under
``<task>/``) and our ``<task>/qsparse_summary.json`` (measured density, activated parameters).
"""

from __future__ import annotations

import glob
import json
import os

from megatron_qsparse.config import ConfigError

#: (column, lm_eval task, few-shot, metric key in lm_eval's results)
PAPER_TASKS: tuple[tuple[str, str, int, str], ...] = (
    ("ARC-C", "arc_challenge", 25, "acc_norm,none"),
    ("HellaSwag", "hellaswag", 10, "acc_norm,none"),
    ("WinoGrande", "winogrande", 5, "acc,none"),
    ("MMLU", "mmlu", 5, "acc,none"),
    ("TruthfulQA", "truthfulqa_mc2", 0, "acc,none"),
)


def _newest(pattern: str) -> str | None:
    files = glob.glob(pattern, recursive=True)
    return max(files, key=os.path.getmtime) if files else None


def read_run(folder: str, tasks=PAPER_TASKS) -> dict:
    """``{"scores": {column: fraction or None}, "activated": float or None, "total": int}``."""
    if not os.path.isdir(folder):
        raise ConfigError(f"--run: {folder} is not a folder; give an eval_paper_suite.sh OUT")
    scores: dict[str, float | None] = {}
    activated, total = [], None
    for column, task, _, metric in tasks:
        res = _newest(os.path.join(folder, task, "**", "results_*.json"))
        value = None
        if res:
            with open(res) as fh:
                value = json.load(fh).get("results", {}).get(task, {}).get(metric)
        scores[column] = None if value is None else float(value)
        summ = os.path.join(folder, task, "qsparse_summary.json")
        if os.path.isfile(summ):
            with open(summ) as fh:
                s = json.load(fh)
            activated.append(float(s["activated_parameters"]))
            total = int(s["non_embedding_parameters"])
    return {"scores": scores, "activated": sum(activated) / len(activated) if activated else None,
            "total": total}


def _params(n: float | None) -> str:
    if n is None:
        return "–"
    for unit, div in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= div:
            return f"{n / div:.2f}{unit}"
    return f"{n:.0f}"


def markdown_table(runs: list[tuple[str, str]], tasks=PAPER_TASKS) -> str:
    """Markdown rows ``label | activated params | task scores (%) | Avg`` for ``(label, folder)``
    pairs; a task without results shows ``–`` and leaves the average out (``–``)."""
    head = ["Model", "Activated params"] + [t[0] for t in tasks] + ["Avg"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * 2 + "---:|" * (len(tasks) + 1)]
    for label, folder in runs:
        r = read_run(folder, tasks)
        vals = [r["scores"][t[0]] for t in tasks]
        cells = ["–" if v is None else f"{100 * v:.1f}" for v in vals]
        avg = "–" if any(v is None for v in vals) else f"{100 * sum(vals) / len(vals):.1f}"
        act = _params(r["activated"])
        if r["activated"] is not None and r["total"]:
            act += f" ({r['activated'] / r['total']:.0%})"
        lines.append("| " + " | ".join([label, act] + cells + [avg]) + " |")
    return "\n".join(lines)
