"""`deepspeed --num_gpus 2 pretrain_qsparse.py --tensor-model-parallel-size 2` end to end: the same
losses as one process, per-TP-rank checkpoint files, and an exact resume."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest

from tests.e2e.test_pretrain_cli import TINY, pretrain, read_scalars
from tests.helpers import ROOT, clean_env

pytestmark = pytest.mark.slow

LAUNCHER = shutil.which("deepspeed") or os.path.join(os.path.dirname(sys.executable), "deepspeed")

# hidden dropout on: the replicated residual stream must drop the same elements on both TP ranks
# (and as in one process), and the resumed run must restore the RNG
COMMON = ["--train-iters", "4", "--eval-iters", "0", "--log-interval", "1",
          "--micro-batch-size", "4", "--deterministic", "--zero-stage", "1",
          "--hidden-dropout", "0.1"]


def launch(data: str, *args: str) -> subprocess.CompletedProcess:
    proc = subprocess.run(
        [LAUNCHER, "--num_gpus", "2", "--master_port", str(29000 + os.getpid() % 500),
         "pretrain_qsparse.py", *TINY, "--data-path", data, *COMMON, *args],
        cwd=ROOT, env=clean_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


@pytest.mark.skipif(not os.path.exists(LAUNCHER), reason="deepspeed launcher not installed")
def test_tp2_matches_one_process_and_resumes(kjv_small, tmp_path):
    one, two = tmp_path / "one.json", tmp_path / "two.json"
    tb_one, tb_two, tb_res, ckpt = (tmp_path / n for n in ("tb1", "tb2", "tb_res", "ckpt"))
    pretrain(kjv_small, *COMMON, "--summary-json", str(one), "--tensorboard-dir", str(tb_one))
    launch(kjv_small, "--tensor-model-parallel-size", "2", "--summary-json", str(two),
           "--tensorboard-dir", str(tb_two), "--save", str(ckpt), "--save-interval", "2")

    # TP = 2 (fp32): the losses of one process, tolerance 1e-4 relative (the all-reduce sums in
    # another order; at a near-tie that can move one activation across the top-K threshold and
    # the loss by ~1e-5; a wrong shard or a missing reduction shows at 1e-2 and above)
    a, b = json.loads(one.read_text()), json.loads(two.read_text())
    ref = dict(read_scalars(str(tb_one))["lm-loss"])
    got = dict(read_scalars(str(tb_two))["lm-loss"])
    assert sorted(got) == [1, 2, 3, 4]
    for step in got:
        assert got[step] == pytest.approx(ref[step], rel=1e-4), (step, got, ref)
    assert b["parameters"] == a["parameters"]  # counted over the shards
    for k, v in a["density"].items():  # measured over whole rows
        assert b["density"][k] == pytest.approx(v, abs=2e-3), (k, b["density"], a["density"])

    # one model file (and one ZeRO optimizer file) per TP rank; the layout is recorded
    files = sorted(os.listdir(ckpt / "iter_0000002"))
    for r in ("00", "01"):
        assert f"mp_rank_{r}_model_states.pt" in files, files
    meta = json.loads((ckpt / "iter_0000002" / "qsparse_meta.json").read_text())
    assert meta["tensor_model_parallel_size"] == 2 and meta["data_parallel_size"] == 1

    # resume at iteration 2 under TP = 2: iterations 3 and 4 replay exactly
    (ckpt / "latest").write_text("iter_0000002")
    proc = launch(kjv_small, "--tensor-model-parallel-size", "2", "--load", str(ckpt),
                  "--tensorboard-dir", str(tb_res))
    assert "resumed from" in proc.stdout + proc.stderr
    resumed = dict(read_scalars(str(tb_res))["lm-loss"])
    assert sorted(resumed) == [3, 4]
    for step in (3, 4):
        assert resumed[step] == got[step], (step, resumed, got)

    # a TP = 2 checkpoint cannot be resumed at TP = 1 (clear error, not a silent mix-up)
    proc = pretrain(kjv_small, *COMMON, "--load", str(ckpt), check=False)
    assert proc.returncode == 2
    assert "--tensor-model-parallel-size 2 but this run uses 1" in proc.stderr
