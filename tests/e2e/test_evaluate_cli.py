"""tools/evaluate.py on a checkpoint the real CLI trained: perplexity against an independent
computation, lm_eval's own CLI on a local task, sparsity overrides, a TP = 2 checkpoint under the
launcher."""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from tests.e2e.test_pretrain_cli import pretrain
from tests.eval_checkpoint import tiny_config, write_checkpoint
from tests.helpers import CORPUS, ROOT, TOKENIZER, clean_env, run_cli

pytestmark = pytest.mark.slow

OFFLINE = {"HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
LAUNCHER = shutil.which("deepspeed") or os.path.join(os.path.dirname(sys.executable), "deepspeed")


@pytest.fixture(scope="module")
def checkpoint(kjv_small, tmp_path_factory):
    ckpt = tmp_path_factory.mktemp("eval_cli") / "ckpt"
    pretrain(kjv_small, "--train-iters", "6", "--eval-iters", "0", "--save", str(ckpt))
    return ckpt


@pytest.fixture(scope="module")
def held_out(tmp_path_factory) -> str:
    """Three chapters the model was not trained on (kjv_small holds the first 120)."""
    path = tmp_path_factory.mktemp("held") / "held.jsonl"
    lines = CORPUS.read_text(encoding="utf-8").splitlines()
    path.write_text("\n".join(lines[1000:1003]) + "\n", encoding="utf-8")
    return str(path)


def test_perplexity_equals_exp_of_mean_token_loss(checkpoint, held_out, tmp_path):
    import sentencepiece as spm

    from megatron_qsparse.checkpoint import load_model

    out = tmp_path / "ppl.json"
    proc = run_cli(["tools/evaluate.py", "perplexity", "--load", str(checkpoint), "--jsonl",
                    held_out, "--max-tokens", "700", "--json", str(out)])
    got = json.loads(out.read_text())
    assert "perplexity" in proc.stdout and "bits per byte" in proc.stdout

    # independently: the training code's loader, SentencePiece itself, disjoint windows of 32
    model, cfg = load_model(str(checkpoint))
    sp = spm.SentencePieceProcessor(model_file=str(TOKENIZER))
    stream = [sp.eos_id()]
    for line in open(held_out, encoding="utf-8"):
        stream += sp.encode(json.loads(line)["text"]) + [sp.eos_id()]
    stream = torch.tensor(stream[:700])
    losses = []
    with torch.no_grad():
        for b in range(0, len(stream) - 1, 32):
            chunk = stream[b:b + 33]
            logits = model(chunk[None, :-1])[0]
            losses.append(F.cross_entropy(logits.double(), chunk[1:], reduction="none"))
    losses = torch.cat(losses)
    assert got["tokens"] == len(losses) == 699
    assert got["perplexity"] == pytest.approx(math.exp(losses.mean().item()), rel=1e-6)
    assert got["bytes"] > 0 and got["bits_per_byte"] == pytest.approx(
        losses.sum().item() / math.log(2) / got["bytes"], rel=1e-6)
    assert got["density"]["kind/qkv"] == 0.5 and got["density"]["kind/gate_up"] == 0.5
    assert got["activated_parameters"] < got["non_embedding_parameters"]


def test_perplexity_of_a_split_with_sparsity_override(checkpoint, kjv_small):
    proc = run_cli(["tools/evaluate.py", "perplexity", "--load", str(checkpoint),
                    "--data-path", kjv_small, "--split-name", "valid", "--max-tokens", "300",
                    "--stride", "16", "--qsparse-ratio", "0.75"])
    assert "tokens scored       299" in proc.stdout
    assert "measured density    qkv 0.250  o 0.250  gate_up 0.250" in proc.stdout
    bad = run_cli(["tools/evaluate.py", "perplexity", "--load", str(checkpoint), "--data-path",
                   kjv_small, "--stride", "64"], check=False)
    assert bad.returncode == 2
    assert bad.stderr.strip().splitlines()[-1].startswith("error: --stride: 64 is outside")


def test_lm_eval_through_the_suite_script_on_the_local_task(checkpoint, tmp_path):
    """examples/eval_paper_suite.sh -> tools/evaluate.py lm-eval -> lm_eval's CLI, offline."""
    out = tmp_path / "suite"
    proc = subprocess.run(["bash", "examples/eval_paper_suite.sh"], cwd=ROOT, text=True,
                          capture_output=True, timeout=600,
                          env=clean_env(CKPT=str(checkpoint), OUT=str(out), SPARSITY="0.75",
                                        TASKS="qsparse_tiny_mc:2", BATCH_SIZE="4",
                                        INCLUDE_PATH=str(ROOT / "examples" / "lm_eval_tasks"),
                                        PY=sys.executable, **OFFLINE))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = [line for line in proc.stdout.splitlines() if line.startswith("|qsparse_tiny_mc")]
    assert rows and "acc" in rows[0], proc.stdout
    acc = float(rows[0].split("|")[7])
    assert 0.0 <= acc <= 1.0
    assert "measured density over the run: qkv 0.250  o 0.250  gate_up 0.250" in proc.stdout
    results = list((out / "qsparse_tiny_mc").rglob("results_*.json"))
    res = json.loads(results[0].read_text())
    assert res["results"]["qsparse_tiny_mc"]["acc,none"] == pytest.approx(acc, abs=1e-4)
    assert res["n-shot"]["qsparse_tiny_mc"] == 2
    summary = json.loads((out / "qsparse_tiny_mc" / "qsparse_summary.json").read_text())
    assert summary["qsparse_ratio"] == 0.75 and summary["density"]["kind/qkv"] == 0.25
    assert summary["activated_parameters"] < 0.4 * summary["non_embedding_parameters"]
    assert "| Model | Activated params |" in proc.stdout  # the table row (paper tasks: none run)


@pytest.mark.skipif(not os.path.exists(LAUNCHER), reason="deepspeed launcher not installed")
def test_tp2_checkpoint_under_the_launcher_equals_one_process(tmp_path, held_out):
    ckpt = tmp_path / "tp2"
    write_checkpoint(str(ckpt), tiny_config(tp=2))
    one, two = tmp_path / "one.json", tmp_path / "two.json"
    args = ["perplexity", "--load", str(ckpt), "--jsonl", held_out, "--max-tokens", "200"]
    run_cli(["tools/evaluate.py", *args, "--json", str(one)])
    proc = subprocess.run([LAUNCHER, "--num_gpus", "2", "--master_port",
                           str(29500 + os.getpid() % 400), "tools/evaluate.py", *args,
                           "--json", str(two)], cwd=ROOT, env=clean_env(), capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    a, b = json.loads(one.read_text()), json.loads(two.read_text())
    assert (a["tensor_parallel_size"], b["tensor_parallel_size"]) == (1, 2)
    assert b["tokens"] == a["tokens"] == 199
    assert b["nll_sum"] == pytest.approx(a["nll_sum"], rel=1e-5)
