"""The multi-GPU recipes in examples/: their commands parse, and their layouts validate for the
world size they are written for (they cannot run here; DRY_RUN=1 prints the command)."""

from __future__ import annotations

import shlex
import subprocess

import pytest

from megatron_qsparse.arguments import parse
from megatron_qsparse.config import data_parallel_size, grad_accumulation_steps
from tests.helpers import ROOT, clean_env


def dry_run(script: str, **env) -> list[str]:
    proc = subprocess.run(["bash", str(ROOT / "examples" / script), "--seed", "7"], cwd=ROOT,
                          env=clean_env(DRY_RUN="1", DATA="0.6 /d/rp_cc 0.4 /d/rp_c4",
                                        TOKENIZER="/t/tokenizer.model", **env),
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    return shlex.split(proc.stdout)


@pytest.mark.parametrize("script,world,tp,pp,dp,gas", [
    ("pretrain_7b_redpajama.sh", 32, 2, 2, 8, 128),
    ("pretrain_1b.sh", 8, 1, 1, 8, 8),
])
def test_recipe_layout_validates(script, world, tp, pp, dp, gas):
    cmd = dry_run(script, HOSTFILE="/h/hostfile")
    assert cmd[0] == "deepspeed"
    args = cmd[cmd.index("pretrain_qsparse.py") + 1:]
    cfg = parse(args, world_size=world)
    p = cfg.parallel
    assert (p.tensor_model_parallel_size, p.pipeline_model_parallel_size) == (tp, pp)
    assert data_parallel_size(cfg, world) == dp
    assert grad_accumulation_steps(cfg, world) == gas
    assert cfg.train.seed == 7  # extra arguments reach the trainer
    assert cfg.data.data_path == ["0.6", "/d/rp_cc", "0.4", "/d/rp_c4"]
    assert (ROOT / p.deepspeed_config).is_file()


def test_7b_recipe_without_ssh_names_its_node():
    cmd = dry_run("pretrain_7b_redpajama.sh", NO_SSH="1", NODE_RANK="3", MASTER_ADDR="10.0.0.1",
                  HOSTFILE="/h/hostfile")
    launcher = cmd[:cmd.index("pretrain_qsparse.py")]
    assert "--no_ssh" in launcher
    assert launcher[launcher.index("--node_rank") + 1] == "3"
    assert launcher[launcher.index("--master_addr") + 1] == "10.0.0.1"


def test_recipe_refuses_to_run_without_data():
    proc = subprocess.run(["bash", str(ROOT / "examples" / "pretrain_1b.sh")], cwd=ROOT,
                          env=clean_env(DRY_RUN="1"), capture_output=True, text=True, timeout=60)
    assert proc.returncode != 0 and "set DATA" in proc.stderr
