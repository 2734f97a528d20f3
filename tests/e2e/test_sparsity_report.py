"""tools/sparsity_report.py on a checkpoint the real CLI trained."""

from __future__ import annotations

import csv

import pytest

from tests.e2e.test_pretrain_cli import pretrain
from tests.helpers import run_cli

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def checkpoint(kjv_small, tmp_path_factory):
    ckpt = tmp_path_factory.mktemp("report") / "ckpt"
    pretrain(kjv_small, "--train-iters", "4", "--eval-iters", "0", "--save", str(ckpt),
             "--qsparse-ratio", "0.5", "--ffn-type", "swiglu")
    return ckpt


def test_report_measures_trained_density(checkpoint, tmp_path):
    out_csv, png = tmp_path / "d.csv", tmp_path / "d.png"
    proc = run_cli(["tools/sparsity_report.py", "--load", str(checkpoint), "--batches", "2",
                    "--csv", str(out_csv), "--plot", str(png)])
    rows = list(csv.DictReader(out_csv.open()))
    assert len(rows) == 2 * 4  # layers x kinds
    assert all(float(r["density"]) == pytest.approx(0.5) for r in rows)  # SwiGLU: no exact zeros
    assert "sparsity 50." in proc.stdout or "sparsity 49." in proc.stdout
    assert png.read_bytes()[:4] == b"\x89PNG"


def test_report_override_changes_density(checkpoint, tmp_path):
    out_csv = tmp_path / "d.csv"
    run_cli(["tools/sparsity_report.py", "--load", str(checkpoint / "iter_0000004"),
             "--batches", "1", "--qsparse-ratio", "0.75", "--csv", str(out_csv)])
    assert all(float(r["density"]) == pytest.approx(0.25) for r in csv.DictReader(out_csv.open()))


def test_report_on_missing_checkpoint_is_one_line_error(tmp_path):
    proc = run_cli(["tools/sparsity_report.py", "--load", str(tmp_path)], check=False)
    assert proc.returncode == 2
    assert "neither a checkpoint folder" in proc.stderr.strip().splitlines()[-1]
