"""Every Q-Sparse variant trains end to end on the sample corpus (tiny model, real CLI)."""

from __future__ import annotations

import json

import pytest

from tests.e2e.test_pretrain_cli import pretrain, read_scalars

pytestmark = pytest.mark.slow

ITERS = 30
EXACT = {"qkv", "o", "gate_up"}  # inputs with no exact zeros: top-K density is exactly K/d


def _exact_half(d):
    return all(d[f"kind/{k}"] == pytest.approx(0.5, abs=1e-9) for k in EXACT)


VARIANTS = {
    "topk": (["--qsparse-mode", "topk"], _exact_half),
    "topk-no-ste": (["--qsparse-mode", "topk", "--no-ste"], _exact_half),
    "topk-l2-rescale": (["--qsparse-mode", "topk", "--qsparse-rescale", "l2"], _exact_half),
    # small values round to 0 on the int8 grid, so a few kept entries can be exact zeros
    "topk-int8": (["--qsparse-mode", "topk", "--qsparse-quantize-activations"],
                  lambda d: all(0.4 < d[f"kind/{k}"] <= 0.5 for k in EXACT)),
    "block-2:4": (["--qsparse-mode", "block", "--qsparse-block", "2:4"], _exact_half),
    "block-4:8": (["--qsparse-mode", "block", "--qsparse-block", "4:8"], _exact_half),
    "relu": (["--qsparse-mode", "relu"], lambda d: all(0.05 < v < 0.95 for v in d.values())),
    "bitnet-topk": (["--qsparse-mode", "topk", "--bitnet"], _exact_half),
    "bitnet-dense": (["--qsparse-mode", "none", "--bitnet"],
                     lambda d: all(d[f"kind/{k}"] == pytest.approx(1.0) for k in EXACT)),
    "swiglu-topk": (["--ffn-type", "swiglu", "--qsparse-mode", "topk"],
                    lambda d: all(v == pytest.approx(0.5, abs=1e-9) for v in d.values())),
    "swiglu-per-projection": (
        ["--ffn-type", "swiglu", "--qsparse-ratio", "0.25", "--qsparse-down-ratio", "0.75"],
        lambda d: d["kind/down"] == pytest.approx(0.25, abs=1e-9)
        and d["kind/qkv"] == pytest.approx(0.75, abs=1e-9)),
}


@pytest.mark.parametrize("name", list(VARIANTS))
def test_variant_trains(kjv_small, tmp_path, name):
    extra, density_ok = VARIANTS[name]
    summary_path = tmp_path / "s.json"
    pretrain(kjv_small, "--train-iters", str(ITERS), "--eval-iters", "1", "--eval-interval",
             str(ITERS), "--qsparse-ratio", "0.5", *extra, "--summary-json", str(summary_path))
    s = json.loads(summary_path.read_text())
    assert s["iterations"] == ITERS
    assert s["train_loss"] < s["first_loss"] - 1.0, (name, s)  # it learns
    assert s["valid_loss"] is not None and s["valid_loss"] < s["first_loss"]
    assert set(s["density"]) == {"kind/qkv", "kind/o", "kind/gate_up", "kind/down"}
    assert density_ok(s["density"]), (name, s["density"])


def test_sparsity_warmup_ramps_density(kjv_small, tmp_path):
    """--qsparse-warmup-iters: density starts dense and reaches 1 - S at the end of the ramp."""
    tb = tmp_path / "tb"
    pretrain(kjv_small, "--train-iters", "20", "--eval-iters", "0", "--log-interval", "1",
             "--qsparse-ratio", "0.5", "--qsparse-warmup-iters", "10", "--ffn-type", "swiglu",
             "--tensorboard-dir", str(tb))
    qkv = dict(read_scalars(str(tb))["density/kind/qkv"])
    scale = dict(read_scalars(str(tb))["sparsity-scale"])
    assert qkv[1] == pytest.approx(1.0)  # step 1 ran at scale 0: dense
    assert qkv[1] > qkv[4] > qkv[8] > qkv[11]
    assert qkv[11] == pytest.approx(0.5, abs=1e-9) and qkv[20] == pytest.approx(0.5, abs=1e-9)
    assert scale[5] == pytest.approx(0.4) and scale[20] == 1.0  # step i runs at (i-1)/10
