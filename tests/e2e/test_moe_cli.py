"""MoE end to end through the real CLI: expert parallelism under ZeRO-2 with the deepspeed
launcher, load balancing measured on the sample corpus, and the MoE demo config."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest

from tests.e2e.test_pretrain_cli import TINY, pretrain
from tests.helpers import ROOT, clean_env

pytestmark = pytest.mark.slow

LAUNCHER = shutil.which("deepspeed") or os.path.join(os.path.dirname(sys.executable), "deepspeed")


def imbalance(summary: dict) -> dict[str, float]:
    """max / mean tokens per expert of each MoE layer in the last log interval (1 = even,
    E = every token on one expert)."""
    return {layer: max(v["load"]) * len(v["load"])
            for layer, v in summary["moe"]["layers"].items()}


@pytest.mark.skipif(not os.path.exists(LAUNCHER), reason="deepspeed launcher not installed")
def test_expert_parallel_zero2_launcher_matches_one_process(kjv_small, tmp_path):
    """`deepspeed --num_gpus 2` with 4 experts split over EP = 2 and ZeRO-2 trains, and — with no
    token dropping and no router noise, so routing is per token — gives the losses of one process
    holding all experts with the same global batch (gradient accumulation 2); its checkpoint
    loads as the one-process model."""
    common = ["--train-iters", "4", "--eval-iters", "0", "--log-interval", "2",
              "--global-batch-size", "8", "--micro-batch-size", "4", "--deterministic",
              "--num-experts", "4", "--moe-router-topk", "2", "--moe-token-drop-policy", "none",
              "--no-moe-top2-sampling", "--moe-z-loss-coeff", "1e-3", "--zero-stage", "2"]
    one = tmp_path / "one.json"
    pretrain(kjv_small, *common, "--summary-json", str(one), "--save", str(tmp_path / "ck1"))
    two = tmp_path / "two.json"
    proc = subprocess.run(
        [sys.executable, LAUNCHER, "--num_gpus", "2", "--master_port",
         str(29300 + os.getpid() % 300),
         "pretrain_qsparse.py", *TINY, "--data-path", kjv_small, *common,
         "--expert-model-parallel-size", "2", "--summary-json", str(two),
         "--save", str(tmp_path / "ck2")],
        cwd=ROOT, env=clean_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    a, b = json.loads(one.read_text()), json.loads(two.read_text())
    assert b["train_loss"] < b["first_loss"]
    assert b["first_loss"] == pytest.approx(a["first_loss"], rel=1e-5)
    assert b["train_loss"] == pytest.approx(a["train_loss"], rel=1e-4)
    # experts on the other EP rank are counted too; activated: 2 of 4 experts
    assert b["parameters"] == a["parameters"]
    assert b["activated_params"] == pytest.approx(a["activated_params"], rel=1e-2)
    for layer in ("0", "1"):
        assert sum(b["moe"]["layers"][layer]["load"]) == pytest.approx(1.0)
        assert b["moe"]["layers"][layer]["dropped"] == 0.0
    # the EP = 2 checkpoint (each rank wrote its experts) loads as one model with every expert,
    # the weights of the one-process run
    import torch

    from megatron_qsparse.checkpoint import load_model

    m1, _ = load_model(str(tmp_path / "ck1"))
    m2, _ = load_model(str(tmp_path / "ck2"))
    s1, s2 = m1.state_dict(), m2.state_dict()
    assert s1.keys() == s2.keys()
    assert any("deepspeed_experts.3." in k for k in s2)
    for k in s1:
        torch.testing.assert_close(s2[k], s1[k], rtol=1e-4, atol=1e-6, msg=k)


def test_load_balancing_evens_expert_load(kjv_small, tmp_path):
    """8 experts, top-1, no capacity limit, 30 steps on the sample corpus, same seed: without the
    auxiliary loss the router collapses onto few experts; with --moe-aux-loss-coeff 0.1 the
    busiest expert of every MoE layer takes at most 2.5x the mean load (measured in the last 10
    of 30 steps: 2.0 and 1.75, against 7.9 and 7.8 without it, 8 = everything on one expert) and
    the imbalance is at most half of the unbalanced run's."""
    args = ["--micro-batch-size", "8", "--train-iters", "30", "--log-interval", "10",
            "--eval-iters", "0", "--num-experts", "8", "--moe-router-topk", "1",
            "--moe-token-drop-policy", "none"]
    runs = {}
    for coeff in ("0", "0.1"):
        path = tmp_path / f"s{coeff}.json"
        pretrain(kjv_small, *args, "--moe-aux-loss-coeff", coeff, "--summary-json", str(path))
        runs[coeff] = imbalance(json.loads(path.read_text()))
    for layer, balanced in runs["0.1"].items():
        assert balanced <= 2.5, runs
        assert balanced <= 0.5 * runs["0"][layer], runs


def test_moe_demo_runs_end_to_end(tmp_path):
    """examples/demo.sh with DEMO_CONFIG=examples/configs/demo_moe.yaml (shortened): preprocess,
    train, evaluate; the log line shows activated params and the MoE losses."""
    out = tmp_path / "demo"
    proc = subprocess.run(
        ["bash", "examples/demo.sh", "--train-iters", "4", "--lr-warmup-iters", "2",
         "--eval-iters", "1", "--eval-interval", "4", "--log-interval", "2",
         "--micro-batch-size", "4", "--seq-length", "64"],
        cwd=ROOT, env=clean_env(DEMO_CONFIG="examples/configs/demo_moe.yaml",
                                DEMO_DIR=str(out), PY=sys.executable),
        capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    s = json.loads((out / "summary.json").read_text())
    assert s["iterations"] == 4 and s["valid_loss"] is not None
    assert sorted(s["moe"]["layers"]) == ["0", "2"]  # --moe-layer-freq 2 of 4 blocks
    assert s["activated_params"] < s["non_embedding_parameters"]
    log = proc.stdout + proc.stderr
    assert "activated params:" in log and "moe aux loss:" in log and "moe dropped:" in log


def test_moe_checkpoint_resumes_and_loads(kjv_small, tmp_path):
    """An MoE run saves (DeepSpeed writes each expert to its own file), resumes to the same
    losses as an uninterrupted run, and load_model reassembles every expert."""
    import torch

    from megatron_qsparse.checkpoint import load_model

    args = ["--eval-iters", "0", "--log-interval", "1", "--num-experts", "4",
            "--moe-router-topk", "2", "--deterministic", "--save", str(tmp_path / "ck"),
            "--save-interval", "2"]
    full = tmp_path / "full.json"
    pretrain(kjv_small, *args, "--train-iters", "4", "--summary-json", str(full))
    shutil.rmtree(tmp_path / "ck" / "iter_0000004")
    (tmp_path / "ck" / "latest").write_text("iter_0000002")
    resumed = tmp_path / "resumed.json"
    pretrain(kjv_small, *args, "--train-iters", "4", "--load", str(tmp_path / "ck"),
             "--summary-json", str(resumed))
    a, b = json.loads(full.read_text()), json.loads(resumed.read_text())
    assert b["train_loss"] == pytest.approx(a["train_loss"], rel=1e-6)
    model, cfg = load_model(str(tmp_path / "ck"))
    assert cfg.model.num_experts == 4
    experts = model.layers[0].mlp.moe.deepspeed_moe.experts.deepspeed_experts
    assert not torch.equal(experts[0].mlp.gate_up.weight, experts[1].mlp.gate_up.weight)
    logits = model(torch.randint(0, 100, (1, 8)))
    assert torch.isfinite(logits).all()
