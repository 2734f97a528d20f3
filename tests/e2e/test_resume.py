"""Runs that survive preemption: kill -9 and exact resume, SIGTERM, exit conditions, pruning."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

import pytest

from tests.e2e.test_pretrain_cli import TINY, pretrain, read_scalars
from tests.helpers import ROOT, clean_env

pytestmark = pytest.mark.slow

# dropout on, so that the RNG state must be restored too for the losses to replay exactly
RUN = ["--log-interval", "1", "--eval-iters", "0", "--hidden-dropout", "0.1",
       "--attention-dropout", "0.1", "--deterministic"]


def start(data: str, *args: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "pretrain_qsparse.py", *TINY, "--data-path", data,
                             *RUN, *args], cwd=ROOT, env=clean_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)


def wait_for(proc: subprocess.Popen, needle: str) -> str:
    seen = []
    for line in proc.stdout:
        seen.append(line)
        if needle in line:
            return "".join(seen)
    raise AssertionError(f"process ended before {needle!r}:\n" + "".join(seen)[-3000:])


def test_kill_9_and_resume_replays_the_same_losses(kjv_small, tmp_path):
    iters = "16"
    ref_tb, tb, ckpt = tmp_path / "ref_tb", tmp_path / "tb", tmp_path / "ckpt"
    pretrain(kjv_small, *RUN, "--train-iters", iters, "--tensorboard-dir", str(ref_tb))

    proc = start(kjv_small, "--train-iters", iters, "--save", str(ckpt), "--save-interval", "5",
                 "--tensorboard-dir", str(tb))
    wait_for(proc, "iteration        8/")
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert (ckpt / "latest").read_text().strip() == "iter_0000005"

    out = pretrain(kjv_small, *RUN, "--train-iters", iters, "--save", str(ckpt),
                   "--save-interval", "5", "--load", str(ckpt), "--tensorboard-dir", str(tb))
    assert "resumed from" in out.stdout + out.stderr

    ref, got = read_scalars(str(ref_tb)), read_scalars(str(tb))
    for tag in ("lm-loss", "grad-norm", "learning-rate"):
        want = dict(ref[tag])
        have = dict(got[tag])  # steps 6..16 were written again by the resumed run
        for step in range(6, 17):
            assert have[step] == want[step], (tag, step, have[step], want[step])


def test_sigterm_saves_and_exits_cleanly(kjv_small, tmp_path):
    ckpt = tmp_path / "ckpt"
    proc = start(kjv_small, "--train-iters", "1000", "--save", str(ckpt))
    wait_for(proc, "iteration        3/")
    proc.send_signal(signal.SIGTERM)
    rest = proc.communicate(timeout=120)[0]
    assert proc.returncode == 0, rest[-3000:]
    assert "received SIGTERM" in rest and "stopped early" in rest
    tag = (ckpt / "latest").read_text().strip()
    meta = json.loads((ckpt / tag / "qsparse_meta.json").read_text())
    assert 3 <= meta["iteration"] < 1000 and tag == f"iter_{meta['iteration']:07d}"


def test_exit_interval_then_resume_to_the_end(kjv_small, tmp_path):
    ckpt, summary = tmp_path / "ckpt", tmp_path / "s.json"
    proc = pretrain(kjv_small, *RUN, "--train-iters", "10", "--exit-interval", "4",
                    "--save", str(ckpt), "--summary-json", str(summary))
    assert "--exit-interval 4 reached" in proc.stdout + proc.stderr
    assert json.loads(summary.read_text())["iterations"] == 4
    assert (ckpt / "latest").read_text().strip() == "iter_0000004"
    pretrain(kjv_small, *RUN, "--train-iters", "10", "--save", str(ckpt), "--load", str(ckpt),
             "--summary-json", str(summary))
    assert json.loads(summary.read_text())["iterations"] == 10
    assert (ckpt / "latest").read_text().strip() == "iter_0000010"


def test_keep_last_n_checkpoints(kjv_small, tmp_path):
    ckpt = tmp_path / "ckpt"
    pretrain(kjv_small, *RUN, "--train-iters", "10", "--save", str(ckpt), "--save-interval", "2",
             "--keep-last-n-checkpoints", "2")
    tags = sorted(p.name for p in ckpt.iterdir() if p.name.startswith("iter_"))
    assert tags == ["iter_0000008", "iter_0000010"]
    assert not any(p.name.startswith(".tmp-") for p in ckpt.iterdir())


def test_finetune_loads_weights_only(kjv_small, tmp_path):
    ckpt, summary = tmp_path / "ckpt", tmp_path / "s.json"
    pretrain(kjv_small, *RUN, "--train-iters", "20", "--save", str(ckpt))
    scratch = tmp_path / "scratch.json"
    pretrain(kjv_small, *RUN, "--train-iters", "2", "--summary-json", str(scratch))
    out = pretrain(kjv_small, *RUN, "--train-iters", "2", "--load", str(ckpt), "--finetune",
                   "--summary-json", str(summary))
    text = out.stdout + out.stderr
    assert "fine-tuning from the weights of" in text and "iteration        1/" in text
    # starts from the trained weights: far below the loss of a fresh model
    assert json.loads(summary.read_text())["first_loss"] < \
        json.loads(scratch.read_text())["first_loss"] - 1.0


def test_load_from_missing_directory_is_one_line_error(kjv_small, tmp_path):
    proc = pretrain(kjv_small, "--train-iters", "2", "--load", str(tmp_path / "nope"),
                    check=False)
    assert proc.returncode == 2
    assert "--load: directory" in proc.stderr.strip().splitlines()[-1]


def test_corrupt_checkpoint_file_is_refused_safely(kjv_small, tmp_path):
    ckpt = tmp_path / "ckpt"
    pretrain(kjv_small, *RUN, "--train-iters", "2", "--save", str(ckpt))
    model_file = ckpt / "iter_0000002" / "mp_rank_00_model_states.pt"
    import pickle

    class Evil:  # a pickle that would run code if loaded with weights_only=False
        def __reduce__(self):
            return (os.system, ("touch " + str(tmp_path / "pwned"),))

    model_file.write_bytes(pickle.dumps({"module": Evil()}))
    proc = pretrain(kjv_small, *RUN, "--train-iters", "4", "--load", str(ckpt), check=False)
    assert proc.returncode == 2
    assert "cannot read" in proc.stderr.strip().splitlines()[-1]
    assert not (tmp_path / "pwned").exists()


def test_exit_duration_saves_and_stops(kjv_small, tmp_path):
    ckpt, summary = tmp_path / "ckpt", tmp_path / "s.json"
    proc = pretrain(kjv_small, *RUN, "--train-iters", "1000", "--exit-duration-in-mins", "0.0001",
                    "--save", str(ckpt), "--summary-json", str(summary))
    assert "--exit-duration-in-mins 0.0001 reached" in proc.stdout + proc.stderr
    done = json.loads(summary.read_text())["iterations"]
    assert 1 <= done < 1000
    assert (ckpt / "latest").read_text().strip() == f"iter_{done:07d}"
