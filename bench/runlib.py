"""Training runs for the study benchmarks, through the real CLI, resumable run by run.

A run lives in its own folder: ``summary.json`` (written by ``pretrain_qsparse.py
--summary-json`` when training ends) with ``exit_reason`` "finished" marks it finished and makes
every later call skip it (a run stopped by a signal writes one too, and is resumed);
``ckpt/`` holds its checkpoints while it trains (``--save``/``--load`` on the same folder, so a run
killed mid-way resumes bit-exactly from its last checkpoint instead of starting again), and
``log.txt`` collects the output of every sitting. Finished runs drop their checkpoints unless
asked to keep them (a base model that other runs continue from).

Used by ``bench/scaling_study.py``, ``bench/study.py`` and ``bench/continue_study.py``; the
``bench/`` folder is on ``sys.path`` when those scripts run.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CORPUS = "examples/data/kjv_sample.jsonl"
TOKENIZER = "examples/data/kjv_sp4k.model"


def prepare_data(work: str, py: str = sys.executable) -> str:
    """The bundled corpus preprocessed like ``make demo`` (once per work folder)."""
    prefix = os.path.join(work, "data", "kjv")
    if not os.path.isfile(prefix + "_text_document.idx"):
        os.makedirs(os.path.dirname(prefix), exist_ok=True)
        subprocess.run([py, "tools/preprocess_data.py", "--input", CORPUS, "--output-prefix",
                        prefix, "--tokenizer-model", TOKENIZER, "--append-eod", "--workers", "2"],
                       cwd=ROOT, check=True)
    return prefix + "_text_document"


def finished(run_dir: str) -> dict | None:
    """The summary of a finished run, or None. A run that stopped early (a SIGTERM, an exit
    interval or duration) also leaves a summary, with its ``exit_reason``: it is not finished,
    and the next sitting resumes it from its checkpoint."""
    path = os.path.join(run_dir, "summary.json")
    if not os.path.isfile(path):
        return None
    with open(path) as fh:
        summary = json.load(fh)
    return summary if summary.get("exit_reason", "finished") == "finished" else None


def train(run_dir: str, flags: list[str], *, save_interval: int, keep_checkpoint: bool = False,
          init: str | None = None, py: str = sys.executable, quiet: bool = False) -> dict:
    """Train one run to completion (resuming a killed one) and return its summary JSON.

    ``flags`` are ``pretrain_qsparse.py`` flags; this adds the checkpoint folder, the summary
    path and the TensorBoard folder. ``init``: a checkpoint folder whose weights a new run starts
    from (``--load INIT --finetune``); a resumed run loads its own checkpoint instead. A failed
    run raises SystemExit naming its log."""
    done = finished(run_dir)
    if done is not None:
        return done
    ckpt = os.path.join(run_dir, "ckpt")
    os.makedirs(ckpt, exist_ok=True)
    resumed = os.path.isfile(os.path.join(ckpt, "latest"))
    start = ["--load", ckpt] if resumed or init is None else ["--load", init, "--finetune"]
    cmd = [py, "pretrain_qsparse.py", *flags, "--save", ckpt, *start,
           "--save-interval", str(save_interval), "--tensorboard-dir",
           os.path.join(run_dir, "tb"), "--summary-json", os.path.join(run_dir, "summary.json")]
    t = time.time()
    with open(os.path.join(run_dir, "log.txt"), "a") as log:
        log.write(f"\n$ {' '.join(cmd)}\n")
        log.flush()
        proc = subprocess.run(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
    if proc.returncode != 0:
        raise SystemExit(f"run {run_dir} failed (exit {proc.returncode}); see {run_dir}/log.txt")
    summary = finished(run_dir)
    if summary is None:
        why = "ended without writing summary.json"
        path = os.path.join(run_dir, "summary.json")
        if os.path.isfile(path):
            with open(path) as fh:
                why = f"stopped early ({json.load(fh).get('exit_reason')}); its checkpoint stays"
        raise SystemExit(f"run {run_dir} {why}: run the study again to resume it; see its log.txt")
    if not keep_checkpoint:
        shutil.rmtree(ckpt, ignore_errors=True)
    if not quiet:
        print(f"  {os.path.relpath(run_dir)}: valid {summary.get('valid_loss', float('nan')):.4f}"
              f" ({time.time() - t:.0f} s{', resumed' if resumed else ''})", flush=True)
    return summary


def read_scalars(tb_dir: str) -> dict:
    """Every scalar of a TensorBoard folder: tag -> [(step, value)]."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(tb_dir, size_guidance={"scalars": 0})
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def write_text(path: str, text: str) -> None:
    from megatron_qsparse import atomic

    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    atomic.write_text(path, text)


def save_fig(fig, path: str) -> None:
    """A matplotlib figure as PNG, written atomically."""
    from megatron_qsparse import atomic

    atomic.save_png(fig, path)
