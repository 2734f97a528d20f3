"""TP x PP x DP layouts and ZeRO stages through the real CLI and the ``deepspeed`` launcher: every
layout reproduces the losses of one process (fp32), a pipeline checkpoint resumes exactly, and two
launchers with node ranks 0 and 1 (two "nodes" on localhost, no ssh) form one job."""

from __future__ import annotations

import itertools
import json
import os
import shutil
import subprocess
import sys

import pytest
import torch

from tests.e2e.test_pretrain_cli import TINY, pretrain, read_scalars
from tests.helpers import ROOT, clean_env, run_cli

pytestmark = pytest.mark.slow

LAUNCHER = shutil.which("deepspeed") or os.path.join(os.path.dirname(sys.executable), "deepspeed")
needs_launcher = pytest.mark.skipif(not os.path.exists(LAUNCHER),
                                    reason="deepspeed launcher not installed")

# 4 blocks (so that 2 stages hold 2 each), gradient accumulation of 2 micro-batches per DP rank at
# DP = 1 (the pipeline then has 2 micro-batches in flight), no dropout (a stage's generator cannot
# replay the draws one process makes for the blocks before it)
COMMON = ["--num-layers", "4", "--train-iters", "3", "--eval-iters", "2", "--eval-interval", "3",
          "--log-interval", "1", "--micro-batch-size", "2", "--global-batch-size", "8",
          "--deterministic"]
# fp32: reductions run in another order under each layout; at a near-tie that can move one
# activation across the top-K threshold and the loss by ~1e-5 relative (a wrong split, shard or
# missing reduction shows at 1e-2 and above)
RTOL = 1e-4
_ports = itertools.count(29100 + os.getpid() % 400 * 2)


def launch(n: int, data: str, *args: str, node_args: tuple[str, ...] = ()) -> str:
    proc = subprocess.run(
        [LAUNCHER, *node_args, *(["--num_gpus", str(n)] if not node_args else []),
         "--master_port", str(next(_ports)), "pretrain_qsparse.py", *TINY, "--data-path", data,
         *COMMON, *args],
        cwd=ROOT, env=clean_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout + proc.stderr


@pytest.fixture(scope="module")
def reference(kjv_small, tmp_path_factory):
    """One process: losses per step, validation loss and the run summary."""
    out = tmp_path_factory.mktemp("ref")
    pretrain(kjv_small, *COMMON, "--tensorboard-dir", str(out / "tb"),
             "--summary-json", str(out / "summary.json"), "--save", str(out / "ckpt"))
    return {**_result(out), "ckpt": out / "ckpt"}


def _result(out) -> dict:
    scalars = read_scalars(str(out / "tb"))
    return {"loss": dict(scalars["lm-loss"]), "grad_norm": dict(scalars["grad-norm"]),
            "summary": json.loads((out / "summary.json").read_text())}


def _assert_same(got: dict, ref: dict) -> None:
    assert sorted(got["loss"]) == [1, 2, 3]
    for step, loss in ref["loss"].items():
        assert got["loss"][step] == pytest.approx(loss, rel=RTOL), (step, got["loss"], ref["loss"])
        assert got["grad_norm"][step] == pytest.approx(ref["grad_norm"][step], rel=1e-3), step
    a, b = ref["summary"], got["summary"]
    assert b["valid_loss"] == pytest.approx(a["valid_loss"], rel=RTOL)
    assert b["parameters"] == a["parameters"]  # counted over TP shards and pipeline stages once
    assert b["activated_params"] == pytest.approx(a["activated_params"], rel=1e-3)
    assert set(b["density"]) == set(a["density"])  # gathered from every stage
    for k, v in a["density"].items():
        assert b["density"][k] == pytest.approx(v, abs=2e-3), (k, b["density"], a["density"])


LAYOUTS = [  # (TP, PP, DP), ZeRO stage, extra flags
    ((1, 2, 1), 0, ()),
    ((1, 1, 2), 1, ()),
    ((2, 2, 1), 1, ()),
    ((1, 2, 2), 1, ("--pipeline-partition-method", "parameters")),
    ((2, 1, 2), 2, ()),
    ((1, 1, 2), 3, ()),
]


@needs_launcher
@pytest.mark.parametrize("layout,zero,extra", LAYOUTS,
                         ids=[f"tp{t}-pp{p}-dp{d}-zero{z}" for (t, p, d), z, _ in LAYOUTS])
def test_layout_matches_one_process(kjv_small, reference, tmp_path, layout, zero, extra):
    tp, pp, dp = layout
    launch(tp * pp * dp, kjv_small, "--tensor-model-parallel-size", str(tp),
           "--pipeline-model-parallel-size", str(pp), "--zero-stage", str(zero), *extra,
           "--tensorboard-dir", str(tmp_path / "tb"), "--summary-json",
           str(tmp_path / "summary.json"), "--save", str(tmp_path / "ckpt"))
    _assert_same(_result(tmp_path), reference)
    if tp == 1 and zero < 3:
        # the checkpoint reads back as one model that predicts like the reference's (weights
        # are compared through the loss: Adam turns last-bit gradient differences of
        # near-zero entries into lr-sized weight differences)
        from megatron_qsparse.checkpoint import load_model

        got, ref = load_model(str(tmp_path / "ckpt"))[0], load_model(str(reference["ckpt"]))[0]
        toks = torch.randint(0, 4000, (2, 33), generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            a, b = (m(toks[:, :-1], toks[:, 1:]).mean().item() for m in (got, ref))
        assert a == pytest.approx(b, rel=1e-4)
        from megatron_qsparse.evaluation.loading import load_for_eval

        evaluated = load_for_eval(str(tmp_path / "ckpt")).model  # evaluation reads it too
        with torch.no_grad():
            assert evaluated(toks[:, :-1], toks[:, 1:]).mean().item() == a


COMPILED = [(1, 0), (1, 1), (2, 2), (2, 3)]  # (DP, ZeRO stage) with --torch-compile


@pytest.mark.parametrize("dp,zero", COMPILED, ids=[f"dp{d}-zero{z}" for d, z in COMPILED])
def test_torch_compile_matches_eager(kjv_small, reference, tmp_path, dp, zero):
    """--torch-compile (every block compiled) under the DeepSpeed engine: the same losses, grad
    norms, validation loss and densities as the eager one-process run, within the layouts'
    fp32 tolerance (compiled norms and matmuls sum in another order)."""
    flags = ["--torch-compile", "--zero-stage", str(zero), "--tensorboard-dir",
             str(tmp_path / "tb"), "--summary-json", str(tmp_path / "summary.json")]
    if dp == 1:
        pretrain(kjv_small, *COMMON, *flags)
    else:
        if not os.path.exists(LAUNCHER):
            pytest.skip("deepspeed launcher not installed")
        launch(dp, kjv_small, *flags)
    _assert_same(_result(tmp_path), reference)


def test_torch_compile_refuses_what_it_does_not_cover(kjv_small):
    for flags, needle in ((["--tensor-model-parallel-size", "2"], "tensor parallelism"),
                          (["--pipeline-model-parallel-size", "2"], "pipeline engine"),
                          (["--num-experts", "2"], "MoE routing")):
        proc = pretrain(kjv_small, "--torch-compile", *flags, check=False)
        assert proc.returncode == 2, proc.stderr[-2000:]
        assert "--torch-compile: " in proc.stderr and needle in proc.stderr
        assert "Traceback" not in proc.stderr


@needs_launcher
def test_pipeline_checkpoint_resumes_exactly(kjv_small, tmp_path):
    """PP = 2 with recomputation: saved at iteration 2, resumed under the same layout, the third
    iteration replays bit for bit; the checkpoint holds one file per layer."""
    ckpt = tmp_path / "ckpt"
    flags = ["--pipeline-model-parallel-size", "2", "--recompute-granularity", "full"]
    launch(2, kjv_small, *flags, "--save", str(ckpt), "--save-interval", "2",
           "--tensorboard-dir", str(tmp_path / "tb"))
    files = sorted(os.listdir(ckpt / "iter_0000002"))
    for i in range(7):  # embedding, 4 blocks, final norm, (tied head: no file of its own)
        if i != 6:
            assert any(f.startswith(f"layer_{i:02d}-") for f in files), files
    meta = json.loads((ckpt / "iter_0000002" / "qsparse_meta.json").read_text())
    assert meta["pipeline_model_parallel_size"] == 2
    full = dict(read_scalars(str(tmp_path / "tb"))["lm-loss"])

    (ckpt / "latest").write_text("iter_0000002")
    out = launch(2, kjv_small, *flags, "--load", str(ckpt),
                 "--tensorboard-dir", str(tmp_path / "tb_res"))
    assert "resumed from" in out
    resumed = dict(read_scalars(str(tmp_path / "tb_res"))["lm-loss"])
    assert resumed == {3: full[3]}

    # re-shard: PP 2 -> 1 keeps every tensor; files written by the converter at PP = 2 are
    # accepted by DeepSpeed's pipeline engine (--finetune starts from those weights)
    from megatron_qsparse.checkpoint import load_model

    for target, pp in (("one", "1"), ("pp2", "2")):
        run_cli(["tools/checkpoint_convert.py", "reshard", "--load", str(ckpt), "--save",
                 str(tmp_path / target), "--target-pipeline-model-parallel-size", pp])
    a, b = load_model(str(ckpt))[0].state_dict(), load_model(str(tmp_path / "one"))[0].state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    out = launch(2, kjv_small, "--pipeline-model-parallel-size", "2", "--load",
                 str(tmp_path / "pp2"), "--finetune", "--train-iters", "2",
                 "--tensorboard-dir", str(tmp_path / "tb_ft"))
    assert "fine-tuning from the weights of" in out
    first = dict(read_scalars(str(tmp_path / "tb_ft"))["lm-loss"])[1]
    assert first < full[1] - 0.1, (first, full)  # trained weights, not a fresh init


@needs_launcher
def test_two_nodes_without_ssh_form_one_job(kjv_small, reference, tmp_path):
    """Two launchers (node ranks 0 and 1, one slot each, one master address) train one PP = 2
    job: stage 0 on "node0", stage 1 on "node1"; the losses are those of one process."""
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("node0 slots=1\nnode1 slots=1\n")
    port = str(next(_ports))
    cmd = lambda rank: [LAUNCHER, "--hostfile", str(hostfile), "--no_ssh", "--node_rank",  # noqa
                        str(rank), "--master_addr", "127.0.0.1", "--master_port", port,
                        "pretrain_qsparse.py", *TINY, "--data-path", kjv_small, *COMMON,
                        "--pipeline-model-parallel-size", "2",
                        "--tensorboard-dir", str(tmp_path / "tb"),
                        "--summary-json", str(tmp_path / "summary.json")]
    nodes = [subprocess.Popen(cmd(r), cwd=ROOT, env=clean_env(), stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True) for r in (0, 1)]
    outs = [n.communicate(timeout=600)[0] for n in nodes]
    for n, out in zip(nodes, outs):
        assert n.returncode == 0, out[-3000:]
    assert "world size 2" in outs[0] or "dist_world_size=2" in outs[0], outs[0][-2000:]
    _assert_same(_result(tmp_path), reference)
