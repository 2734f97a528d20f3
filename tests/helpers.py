"""Helpers for tests: a clean environment for child processes and running the repo's scripts."""

from __future__ import annotations

import importlib
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CORPUS = ROOT / "examples" / "data" / "kjv_sample.jsonl"
TOKENIZER = ROOT / "examples" / "data" / "kjv_sp4k.model"

os.environ.setdefault("DS_ACCELERATOR", "cpu")

_DIST_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR",
              "MASTER_PORT", "GROUP_RANK", "ROLE_RANK", "CROSS_RANK", "CROSS_SIZE")


def clean_env(**extra: str) -> dict:
    """The environment for a child process: no inherited process-group variables, CPU DeepSpeed,
    this checkout first on PYTHONPATH (its package, whether or not an install points here)."""
    env = {k: v for k, v in os.environ.items() if k not in _DIST_VARS}
    env["DS_ACCELERATOR"] = "cpu"
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    env.update(extra)
    return env


def run_cli(args: list[str], timeout: int = 600, check: bool = True, **env) -> subprocess.CompletedProcess:
    """Run a repo script (``pretrain_qsparse.py``, ``tools/...``) with this interpreter."""
    proc = subprocess.run([sys.executable, *args], cwd=ROOT, env=clean_env(**env),
                          capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"{args[0]} exited {proc.returncode}\nstdout:\n{proc.stdout[-4000:]}"
                             f"\nstderr:\n{proc.stderr[-4000:]}")
    return proc


def load_tool(name: str):
    """``tools/<name>.py`` as a module (``tools.<name>``; the repo root is on pytest's path)."""
    return importlib.import_module(f"tools.{name}")
