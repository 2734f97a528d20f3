"""Bad inputs and faults, as a new user and an operator meet them: each ends in one line that
names the problem and the fix (no traceback), with a clear exit code, and leaves nothing poisoned
or half-written on disk.

What is simulated, and how (the tests run as root on a shared machine, without a tiny disk):
- a full disk: ``RLIMIT_FSIZE`` (``ulimit -f``) in the child with ``SIGXFSZ`` ignored, so writes
  past the limit fail with EFBIG, the way they fail with ENOSPC on a full disk;
- a read-only directory: ``chmod`` does not stop root, so a path below a regular file (ENOTDIR)
  for the real CLI, and an injected ``OSError(EROFS)`` in-process;
- weights that turn NaN: a wrapper that runs ``pretrain_qsparse.py`` and fills one weight with NaN
  after a chosen iteration (what an overflowing update does).
"""

from __future__ import annotations

import errno
import json
import os
import resource
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest

from tests.e2e.test_pretrain_cli import TINY
from tests.helpers import ROOT, TOKENIZER, clean_env, load_tool, run_cli

pytestmark = pytest.mark.slow

FAST = ["--train-iters", "4", "--eval-iters", "0", "--log-interval", "1"]


def one_line_error(proc: subprocess.CompletedProcess, code: int, *needles: str) -> str:
    """The run exited ``code`` with an ``error:`` line holding every needle, and no traceback."""
    out = proc.stdout + proc.stderr
    assert proc.returncode == code, out[-3000:]
    assert "Traceback" not in out, out[-3000:]
    lines = [ln for ln in out.splitlines() if ln.startswith("error:")]
    assert lines, out[-3000:]
    for needle in needles:
        assert needle in lines[-1], lines[-1]
    return lines[-1]


def pretrain(data: str, *args: str, wrapper: str | None = None, preexec=None, timeout=300):
    cmd = ["pretrain_qsparse.py", *TINY, "--data-path", data, *args]
    if wrapper is not None:
        cmd = ["-c", wrapper, *cmd]
    return subprocess.run([sys.executable, *cmd], cwd=ROOT, env=clean_env(), text=True,
                          capture_output=True, timeout=timeout, preexec_fn=preexec)


# runs pretrain_qsparse.py after making the weights NaN once iteration N is done
POISON_AT = textwrap.dedent("""
    import runpy, sys, torch
    from megatron_qsparse.training.trainer import Trainer
    step, at = Trainer.step, AT
    def poisoned(self):
        loss = step(self)
        if self.state.iteration == at:
            with torch.no_grad():
                next(self.model.parameters()).fill_(float("nan"))
        return loss
    Trainer.step = poisoned
    sys.argv = sys.argv[1:]
    runpy.run_path(sys.argv[0], run_name="__main__")
""")


# ---------------------------------------------------------------------------------------------
# silently wrong or poisoned


@pytest.mark.parametrize("flag,value", [("--lr", "inf"), ("--lr", "nan"), ("--lr", "1e6"),
                                        ("--clip-grad", "inf"), ("--weight-decay", "nan")])
def test_non_finite_and_absurd_numeric_flags_are_refused_at_start(flag, value):
    proc = run_cli(["pretrain_qsparse.py", "--data-path", "x", "--tokenizer-type",
                    "ByteTokenizer", flag, value], check=False)
    one_line_error(proc, 2, flag + ":")


def test_no_checkpoint_with_nan_weights_becomes_latest(kjv_small, tmp_path):
    ckpt = tmp_path / "ckpt"
    proc = pretrain(kjv_small, "--train-iters", "6", "--eval-iters", "0", "--save", str(ckpt),
                    "--save-interval", "2", "--keep-last-n-checkpoints", "1",
                    wrapper=POISON_AT.replace("AT", "3"))
    one_line_error(proc, 1, "iteration 4", "NaN/Inf", "stays at iter_0000002")
    assert (ckpt / "latest").read_text().strip() == "iter_0000002"
    assert sorted(os.listdir(ckpt)) == ["iter_0000002", "latest"]  # pruning kept the good one


def test_nan_weights_at_the_end_fail_the_run_without_save(kjv_small):
    proc = pretrain(kjv_small, *FAST, wrapper=POISON_AT.replace("AT", "4"))
    one_line_error(proc, 1, "NaN/Inf after iteration 4")


def test_eval_interval_zero_switches_evaluation_off(kjv_small, tmp_path):
    summary = tmp_path / "s.json"
    proc = pretrain(kjv_small, "--train-iters", "4", "--eval-interval", "0", "--eval-iters", "2",
                    "--summary-json", str(summary))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "validation loss" not in proc.stdout + proc.stderr
    assert json.loads(summary.read_text())["valid_loss"] is None


# ---------------------------------------------------------------------------------------------
# --save that cannot be written


def test_unwritable_save_dir_is_refused_at_start(kjv_small, tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    proc = pretrain(kjv_small, *FAST, "--save", str(blocker / "ckpt"))
    one_line_error(proc, 2, "--save: cannot write to", "writable directory")
    assert "iteration" not in proc.stdout + proc.stderr  # refused before training


def test_read_only_save_dir_message(tmp_path, monkeypatch):
    """EROFS is injected (root ignores chmod): the start-up check names it."""
    from megatron_qsparse.config import ConfigError
    from megatron_qsparse.training import checkpointing

    def read_only(*a, **k):
        raise OSError(errno.EROFS, os.strerror(errno.EROFS))

    monkeypatch.setattr(checkpointing.tempfile, "mkstemp", read_only)
    with pytest.raises(ConfigError, match=r"--save: cannot write to .*Read-only file system, "
                                          r"EROFS\); point --save at a writable directory"):
        checkpointing.check_save_dir(str(tmp_path / "ckpt"))


def _fsize_limit(nbytes: int):
    def limit():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # EFBIG instead of a kill, as ENOSPC
        resource.setrlimit(resource.RLIMIT_FSIZE, (nbytes, nbytes))
    return limit


def test_full_disk_during_save_keeps_latest_and_removes_the_partial_folder(kjv_small, tmp_path):
    ckpt = tmp_path / "ckpt"
    # a good checkpoint first, then a disk too small for the next one (EFBIG, as ENOSPC)
    first = pretrain(kjv_small, "--train-iters", "1", "--lr-warmup-iters", "0", "--eval-iters", "0", "--save", str(ckpt))
    assert first.returncode == 0, first.stderr[-3000:]
    proc = pretrain(kjv_small, "--train-iters", "2", "--eval-iters", "0", "--save", str(ckpt),
                    "--load", str(ckpt), "--data-cache-path", str(tmp_path / "cache"),
                    preexec=_fsize_limit(256 * 1024))
    one_line_error(proc, 1, "could not write checkpoint iter_0000002", "stays at iter_0000001")
    assert (ckpt / "latest").read_text().strip() == "iter_0000001"
    assert sorted(os.listdir(ckpt)) == ["iter_0000001", "latest"]  # no .tmp-iter_* left


def test_tampered_rng_state_is_refused_in_one_line(kjv_small, tmp_path):
    ckpt = tmp_path / "ckpt"
    assert pretrain(kjv_small, "--train-iters", "1", "--lr-warmup-iters", "0", "--eval-iters", "0",
                    "--save", str(ckpt)).returncode == 0
    rng = ckpt / "iter_0000001" / "rng_rank00000.pt"
    import pickle
    import torch

    class Evil:
        def __reduce__(self):
            return (os.system, ("touch " + str(tmp_path / "pwned"),))

    torch.save({"python": Evil()}, rng, pickle_protocol=pickle.DEFAULT_PROTOCOL)
    proc = pretrain(kjv_small, "--train-iters", "2", "--eval-iters", "0", "--load", str(ckpt))
    one_line_error(proc, 2, "--load: cannot read", "rng_rank00000.pt")
    assert not (tmp_path / "pwned").exists()


# ---------------------------------------------------------------------------------------------
# orphaned ranks

LAUNCHER = os.path.join(os.path.dirname(sys.executable), "deepspeed")


@pytest.mark.skipif(not os.path.exists(LAUNCHER), reason="deepspeed launcher not installed")
def test_kill_9_of_the_launcher_stops_every_rank(kjv_small, tmp_path):
    import psutil

    log = tmp_path / "log.txt"
    with open(log, "w") as out:
        runner = subprocess.Popen(
            [LAUNCHER, "--num_gpus", "2", "--master_port", str(29500 + os.getpid() % 400),
             "pretrain_qsparse.py", *TINY, "--data-path", kjv_small, "--train-iters", "100000",
             "--eval-iters", "0", "--log-interval", "1"],
            cwd=ROOT, env=clean_env(), stdout=out, stderr=subprocess.STDOUT,
            start_new_session=True)
    try:
        deadline = time.time() + 240
        while "iteration        2/" not in log.read_text():
            assert runner.poll() is None and time.time() < deadline, log.read_text()[-3000:]
            time.sleep(0.5)
        job = psutil.Process(runner.pid).children(recursive=True)  # launch.py and both ranks
        ranks = [p for p in job if "pretrain_qsparse.py" in " ".join(p.cmdline())
                 and "deepspeed" not in " ".join(p.cmdline())]
        assert len(ranks) == 2, [p.cmdline() for p in job]
        os.kill(runner.pid, signal.SIGKILL)  # the launcher only, as a scheduler would
        runner.wait()
        killed = time.time()
        gone, alive = psutil.wait_procs(job, timeout=15)
        assert not alive, f"still running {time.time() - killed:.0f} s later: {alive}"
        assert "the launcher (pid" in log.read_text()
    finally:
        try:
            os.killpg(runner.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
