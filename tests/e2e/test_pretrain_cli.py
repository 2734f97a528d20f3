"""The real CLI end to end on tiny configs: train, evaluate, log, save, resume, fail clearly."""

from __future__ import annotations

import json
import os
import shutil

import pytest

from tests.helpers import ROOT, TOKENIZER, run_cli

pytestmark = pytest.mark.slow

TINY = ["--num-layers", "2", "--hidden-size", "64", "--num-attention-heads", "4",
        "--num-query-groups", "2", "--seq-length", "32", "--micro-batch-size", "4",
        "--tokenizer-type", "SentencePieceTokenizer", "--tokenizer-model", str(TOKENIZER),
        "--lr", "3e-3", "--min-lr", "3e-4", "--lr-warmup-iters", "2", "--split", "90,10,0",
        "--eval-iters", "2", "--log-interval", "5", "--qsparse-mode", "topk",
        "--qsparse-ratio", "0.5"]


def pretrain(data: str, *args: str, check: bool = True):
    return run_cli(["pretrain_qsparse.py", *TINY, "--data-path", data, *args], check=check)


def read_scalars(tb_dir: str) -> dict[str, list[tuple[int, float]]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(tb_dir)
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def test_train_eval_tensorboard_summary(kjv_small, tmp_path):
    tb, summary_path = tmp_path / "tb", tmp_path / "summary.json"
    proc = pretrain(kjv_small, "--train-iters", "40", "--eval-interval", "20", "--lr-warmup-iters", "5",
                    "--tensorboard-dir", str(tb), "--summary-json", str(summary_path),
                    "--log-sparsity-per-layer", "--test", "--split", "80,10,10")
    out = proc.stdout + proc.stderr
    assert "iteration       40/      40" in out
    assert "validation loss at iteration 20" in out and "validation loss at iteration 40" in out
    assert "run summary" in proc.stdout

    summary = json.loads(summary_path.read_text())
    assert summary["iterations"] == 40
    assert summary["train_loss"] < summary["first_loss"] - 1.0, summary  # it learns
    assert summary["valid_loss"] is not None and summary["tokens_per_sec"] > 0
    # top-K at S = 0.5 keeps exactly half of every linear input (widths here are even); the down
    # projection's input comes after ReLU², whose exact zeros can leave fewer than K non-zeros
    density = summary["density"]
    assert set(density) == {"kind/qkv", "kind/o", "kind/gate_up", "kind/down"}
    for kind in ("qkv", "o", "gate_up"):
        assert density[f"kind/{kind}"] == pytest.approx(0.5, abs=1e-9)
    assert 0.2 < density["kind/down"] <= 0.5

    scalars = read_scalars(str(tb))
    assert summary["test_loss"] is not None and "test loss at iteration 40" in out
    for tag in ("lm-loss", "learning-rate", "grad-norm", "tokens-per-sec", "iteration-time-ms",
                "tflops-per-gpu/dense", "tflops-per-gpu/activated", "activated-params",
                "memory/max-rss-gb", "skipped-iterations", "loss-spikes", "density/kind/qkv",
                "density/kind/down", "density/layer0/qkv", "density/layer1/down",
                "grad-norm/layer0/qkv", "grad-norm/layer1/down", "lm-loss-validation/lm loss",
                "lm-loss-validation/lm loss ppl", "lm-loss-test/lm loss"):
        assert tag in scalars, sorted(scalars)
    assert [s for s, _ in scalars["lm-loss"]] == [5, 10, 15, 20, 25, 30, 35, 40]
    lrs = dict(scalars["learning-rate"])
    assert lrs[5] == pytest.approx(3e-3)  # end of warm-up
    assert lrs[40] < lrs[20] < lrs[5]  # cosine decay
    tflops = dict(scalars["tflops-per-gpu/dense"])[40]
    assert 0 < dict(scalars["tflops-per-gpu/activated"])[40] < tflops  # top-K halves the inputs


def test_dense_mode_reports_full_density(kjv_small, tmp_path):
    summary_path = tmp_path / "s.json"
    pretrain(kjv_small, "--train-iters", "3", "--qsparse-mode", "none", "--eval-iters", "0",
             "--summary-json", str(summary_path))
    density = json.loads(summary_path.read_text())["density"]
    assert set(density) == {"kind/qkv", "kind/o", "kind/gate_up", "kind/down"}
    for kind in ("qkv", "o", "gate_up"):
        assert density[f"kind/{kind}"] == pytest.approx(1.0)
    assert density["kind/down"] < 1.0  # ReLU² zeroes some of the down projection's input


def test_save_and_resume_continues(kjv_small, tmp_path):
    ckpt = tmp_path / "ckpt"
    pretrain(kjv_small, "--train-iters", "12", "--save", str(ckpt), "--save-interval", "6",
             "--eval-iters", "0")
    assert (ckpt / "latest").read_text().strip() == "iter_0000012"
    meta = json.loads((ckpt / "iter_0000006" / "qsparse_meta.json").read_text())
    assert meta["iteration"] == 6 and meta["consumed_samples"] == 24

    # go back to iteration 6 and train on: the run resumes there, not at 0
    (ckpt / "latest").write_text("iter_0000006")
    proc = pretrain(kjv_small, "--train-iters", "12", "--load", str(ckpt), "--eval-iters", "0")
    out = proc.stdout + proc.stderr
    assert "resumed from" in out and "iteration        6/      12" not in out
    assert "iteration       10/      12" in out


def test_resume_with_other_shape_fails_clearly(kjv_small, tmp_path):
    ckpt = tmp_path / "ckpt"
    pretrain(kjv_small, "--train-iters", "2", "--save", str(ckpt), "--eval-iters", "0")
    proc = pretrain(kjv_small, "--train-iters", "4", "--load", str(ckpt), "--hidden-size", "128",
                    "--eval-iters", "0", check=False)
    assert proc.returncode == 2
    assert "--hidden-size 64 but this run has 128" in proc.stderr.strip().splitlines()[-1]


def test_missing_dataset_is_one_line_error(tmp_path):
    proc = pretrain(str(tmp_path / "nothing_here"), "--train-iters", "2", check=False)
    assert proc.returncode == 2
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("error: --data-path") and "nothing_here" in last


def test_yaml_demo_config_runs(kjv_small, tmp_path):
    """The demo's YAML config, shortened, through the same entry point."""
    summary_path = tmp_path / "s.json"
    run_cli(["pretrain_qsparse.py", "--config", "examples/configs/demo_tiny.yaml",
             "--data-path", kjv_small, "--train-iters", "4", "--lr-warmup-iters", "2",
             "--eval-iters", "1", "--log-interval", "2", "--summary-json", str(summary_path)])
    assert json.loads(summary_path.read_text())["iterations"] == 4


@pytest.mark.skipif(shutil.which("deepspeed") is None and
                    not os.path.exists(os.path.join(os.path.dirname(os.sys.executable),
                                                    "deepspeed")),
                    reason="deepspeed launcher not installed")
def test_deepspeed_launcher_two_ranks_matches_one(kjv_small, tmp_path):
    """`deepspeed --num_gpus 2` (two gloo ranks, data parallel, ZeRO-1) gives the losses of one
    process with the same global batch."""
    launcher = shutil.which("deepspeed") or os.path.join(os.path.dirname(os.sys.executable),
                                                         "deepspeed")
    common = ["--train-iters", "4", "--eval-iters", "0", "--log-interval", "1",
              "--global-batch-size", "8", "--micro-batch-size", "4", "--deterministic"]
    one = tmp_path / "one.json"
    pretrain(kjv_small, *common, "--summary-json", str(one), "--zero-stage", "1")
    two = tmp_path / "two.json"
    import subprocess
    import sys

    from tests.helpers import clean_env

    proc = subprocess.run(
        [launcher, "--num_gpus", "2", "--master_port", str(29600 + os.getpid() % 300),
         "pretrain_qsparse.py", *TINY, "--data-path", kjv_small, *common, "--zero-stage", "1",
         "--summary-json", str(two)],
        cwd=ROOT, env=clean_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    a, b = json.loads(one.read_text()), json.loads(two.read_text())
    assert b["first_loss"] == pytest.approx(a["first_loss"], rel=1e-5)
    assert b["train_loss"] == pytest.approx(a["train_loss"], rel=1e-4)


@pytest.mark.parametrize("args,needle", [
    (["--vocab-size", "100"], "--vocab-size: 100 is smaller than the tokenizer's 4096"),
    (["--distributed-backend", "nccl"], "--distributed-backend: nccl needs GPUs"),
])
def test_setup_errors_are_one_line(kjv_small, args, needle):
    import torch

    if "nccl" in args and torch.cuda.is_available():
        pytest.skip("a GPU is visible")
    proc = pretrain(kjv_small, "--train-iters", "2", *args, check=False)
    assert proc.returncode == 2
    assert needle in proc.stderr.strip().splitlines()[-1]
