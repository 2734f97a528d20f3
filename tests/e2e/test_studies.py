"""The study benchmarks' machinery on tiny cases: resumable runs (bench/runlib.py), the scaling
grid's sizes, budgets and collection (bench/scaling_study.py), and the seed table (bench/study.py).
The studies themselves are benchmarks, not tests."""

from __future__ import annotations

import importlib
import json
import subprocess
import sys

import pytest

from tests.e2e.test_pretrain_cli import TINY, pretrain
from tests.helpers import ROOT

sys.path.insert(0, str(ROOT / "bench"))
runlib = importlib.import_module("runlib")
scaling = importlib.import_module("scaling_study")
study = importlib.import_module("study")

pytestmark = pytest.mark.slow
FLAGS = [*TINY, "--train-iters", "8", "--eval-interval", "8", "--log-interval", "1",
         "--deterministic"]


def test_a_finished_run_is_skipped_without_training(tmp_path, monkeypatch):
    run = tmp_path / "run"
    run.mkdir()
    (run / "summary.json").write_text(json.dumps({"valid_loss": 4.5}))

    def no_training(*a, **k):
        raise AssertionError("a finished run was trained again")
    monkeypatch.setattr(subprocess, "run", no_training)
    assert runlib.train(str(run), ["--anything"], save_interval=5) == {"valid_loss": 4.5}


def test_a_killed_run_resumes_from_its_checkpoint_to_the_same_result(kjv_small, tmp_path):
    data = ["--data-path", kjv_small]
    whole = runlib.train(str(tmp_path / "whole"), [*FLAGS, *data], save_interval=4, quiet=True)
    assert whole["iterations"] == 8 and not (tmp_path / "whole" / "ckpt").exists()

    # the same run stopped after its checkpoint at iteration 4, with the summary a stopped run
    # writes (as a SIGTERM leaves it) ...
    cut = tmp_path / "cut"
    pretrain(kjv_small, "--train-iters", "8", "--eval-interval", "8", "--log-interval", "1",
             "--deterministic", "--save", str(cut / "ckpt"), "--save-interval", "4",
             "--exit-interval", "4", "--summary-json", str(cut / "summary.json"))
    assert (cut / "ckpt" / "latest").read_text().strip() == "iter_0000004"
    assert json.loads((cut / "summary.json").read_text())["exit_reason"] != "finished"
    assert runlib.finished(str(cut)) is None
    # ... is finished by the next sitting from there, with the uninterrupted run's result
    again = runlib.train(str(cut), [*FLAGS, *data], save_interval=4, quiet=True)
    log = (cut / "log.txt").read_text()
    assert "resumed from" in log and again["iterations"] == 8
    assert again["valid_loss"] == whole["valid_loss"]
    assert again["train_loss"] == whole["train_loss"]


def test_a_failed_run_names_its_log(tmp_path):
    with pytest.raises(SystemExit, match=r"failed \(exit 2\); see .*log.txt"):
        runlib.train(str(tmp_path / "bad"), ["--num-layers", "-1"], save_interval=4)
    assert runlib.finished(str(tmp_path / "bad")) is None


def test_scaling_grid_sizes_and_budgets_follow_the_stated_rules():
    from megatron_qsparse.config import ModelConfig
    from megatron_qsparse.model.accounting import count_parameters
    from megatron_qsparse.model.gpt import GPTModel
    from megatron_qsparse.parallel.state import ParallelState

    ns = []
    for size, (layers, hidden, heads, groups) in scaling.SIZES.items():
        cfg = ModelConfig(num_layers=layers, hidden_size=hidden, num_attention_heads=heads,
                          num_query_groups=groups, seq_length=128, ffn_type="relu2_glu")
        model = GPTModel(cfg, 4096, parallel=ParallelState.single(), init_seed=0)
        n = scaling.non_embedding_params(layers, hidden, heads, groups)
        assert n == count_parameters(model, non_embedding=True), size
        ns.append(n)
        d = scaling.token_budget(n)
        assert d % (scaling.MICRO_BATCH * scaling.SEQ) == 0
        exact = scaling.BASE_TOKENS * (n / ns[0]) ** scaling.TOKEN_EXPONENT
        assert exact <= d < exact + scaling.MICRO_BATCH * scaling.SEQ
    assert ns == sorted(ns) and ns[-1] / ns[0] >= 8  # the span
    assert len(set(scaling.SPARSITIES)) >= 5 and 0.0 in scaling.SPARSITIES


def test_scaling_collect_writes_the_runs_csv_of_finished_runs(tmp_path):
    work, out = tmp_path / "work", tmp_path / "out"
    for (prec, size, s), loss in zip([("fp", "xs", 0.0), ("fp", "s", 0.6), ("bitnet", "xs", 0.3)],
                                     (5.0, 4.8, 5.3)):
        d = scaling.run_dir(str(work), prec, size, s)
        (tmp_path / d).mkdir(parents=True)
        (tmp_path / d / "summary.json").write_text(json.dumps({
            "non_embedding_parameters": scaling.non_embedding_params(*scaling.SIZES[size]),
            "valid_loss": loss, "bits": 1.58 if prec == "bitnet" else 16, "iterations": 10,
            "train_loss": loss - 0.1, "tokens_per_sec": 1000.0}))
    rows = scaling.collect(str(work), str(out), list(scaling.SIZES), [0.0, 0.3, 0.6],
                           ["fp", "bitnet"])
    assert [(r["precision"], r["size"], r["sparsity"], r["loss"]) for r in rows] == [
        ("fp", "xs", 0.0, 5.0), ("fp", "s", 0.6, 4.8), ("bitnet", "xs", 0.3, 5.3)]
    text = (out / "runs.csv").read_text().splitlines()
    assert text[0].startswith("params,sparsity,loss,bits,size") and len(text) == 4
    table = scaling.tables(rows, list(scaling.SIZES), [0.0, 0.3, 0.6])
    assert "| 5.0000 | – | – |" in table and "**BitNet b1.58**" in table


def test_seed_table_reports_mean_std_and_whether_a_gap_exceeds_the_spread():
    def runs(losses):
        return [{"valid_loss": v, "train_loss": v, "tokens_per_sec": 1.0,
                 "non_embedding_parameters": 10, "activated_params": 5, "density": {"qkv": 0.5}}
                for v in losses]
    table = study.size_table("demo", {"dense": runs([4.60, 4.61, 4.62]),
                                      "topk-0.4": runs([4.605, 4.615, 4.625]),
                                      "relu": runs([4.90, 4.91, 4.92])})
    lines = {line.split(" | ")[0][2:]: line for line in table.splitlines()[2:]}
    assert "4.6100 ± 0.0100" in lines["dense"]
    assert "+0.0050 ± 0.0082 | no |" in lines["topk-0.4"]
    assert "+0.3000 ± 0.0082 | yes |" in lines["relu"]
