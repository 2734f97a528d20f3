"""tools/calibrate_thresholds.py end to end: TEAL thresholds for a dense checkpoint the real CLI
trained (then evaluate and generate through their CLIs) and for an imported Hugging Face model
(logits against transformers with thresholding pre-hooks written here); bad input."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from tests.e2e.test_pretrain_cli import pretrain
from tests.hf_models import VOCAB, build_hf_model, converter
from tests.helpers import run_cli

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def dense_ckpt(kjv_small, tmp_path_factory):
    ckpt = tmp_path_factory.mktemp("teal") / "dense"
    pretrain(kjv_small, "--qsparse-mode", "none", "--train-iters", "8", "--eval-iters", "0",
             "--save", str(ckpt))
    return ckpt


def calibrate(load, data, save, *extra, check=True):
    return run_cli(["tools/calibrate_thresholds.py", "--load", str(load), "--data-path",
                    str(data), "--save", str(save), *extra], check=check)


def test_calibrate_evaluate_generate(dense_ckpt, kjv_small, tmp_path):
    save = tmp_path / "teal"
    proc = calibrate(dense_ckpt, kjv_small, save, "--sparsity", "0.4",
                     "--calibration-tokens", "8192", "--split-name", "all")
    assert "threshold S=0.4 (TEAL)" in proc.stdout
    meta = json.loads(next(save.glob("iter_*/qsparse_meta.json")).read_text())
    q = meta["config"]["qsparse"]
    assert q["mode"] == "threshold" and q["ratio"] == 0.4
    assert q["calibration"]["tokens"] == 8192 and len(q["calibration"]["thresholds"]) == 8
    for ratio, want in ((None, 0.6), ("0.6", 0.4)):
        out = tmp_path / f"ppl{ratio}.json"
        run_cli(["tools/evaluate.py", "perplexity", "--load", str(save), "--data-path", kjv_small,
                 "--split-name", "all", "--max-tokens", "4096", "--json", str(out),
                 *(["--qsparse-ratio", ratio] if ratio else [])])
        got = json.loads(out.read_text())
        assert got["qsparse_mode"] == "threshold"
        for kind in ("qkv", "gate_up"):  # inputs of the normed projections: on target
            assert got["density"][f"kind/{kind}"] == pytest.approx(want, abs=0.05), got["density"]
        assert got["density"]["kind/o"] < want + 0.05
    gen = run_cli(["tools/generate.py", "--load", str(save), "--max-new-tokens", "8", "--greedy"])
    # thresholds decode through the compiled step (the method describes its decode op)
    assert "threshold S=0.4 (TEAL)" in gen.stderr and "compiled-step" in gen.stderr


def test_bad_input(dense_ckpt, kjv_small, tmp_path):
    same = calibrate(dense_ckpt, kjv_small, dense_ckpt, check=False)
    assert same.returncode == 2 and "it is --load's save directory" in same.stderr
    assert "Traceback" not in same.stderr
    nodata = calibrate(dense_ckpt, tmp_path / "missing", tmp_path / "o", check=False)
    assert nodata.returncode == 2 and ".bin/.idx not found" in nodata.stderr
    assert not (tmp_path / "o").exists()
    ratio = calibrate(dense_ckpt, kjv_small, tmp_path / "o", "--sparsity", "1.2", check=False)
    assert ratio.returncode == 2 and "--sparsity: 1.2 is outside [0, 1)" in ratio.stderr
    # training in threshold mode without thresholds is refused with the fix
    proc = pretrain(kjv_small, "--qsparse-mode", "threshold", "--train-iters", "2", check=False)
    assert proc.returncode == 2 and "tools/calibrate_thresholds.py" in proc.stderr


def _token_dataset(prefix: str, n_docs=40, seed=0) -> None:
    from megatron_qsparse.data.indexed_dataset import IndexedDatasetBuilder

    rng = np.random.default_rng(seed)
    b = IndexedDatasetBuilder(prefix)
    for _ in range(n_docs):
        b.add_document(rng.integers(0, VOCAB, int(rng.integers(40, 120))).astype(np.int32))
    b.finalize()


def test_hugging_face_model_without_training(tmp_path):
    """TEAL on an imported LLaMA: our thresholded logits equal transformers' model run with
    pre-hooks that zero |x| < t on every projection input (t from the stored tables)."""
    from megatron_qsparse.checkpoint import load_model
    from megatron_qsparse.sparsity.methods.threshold import threshold_at

    ref = build_hf_model("llama", str(tmp_path / "hf"))
    assert converter().main(["import-hf", "--hf-dir", str(tmp_path / "hf"), "--save",
                             str(tmp_path / "ck")]) == 0
    _token_dataset(str(tmp_path / "tok"))
    calibrate(tmp_path / "ck", tmp_path / "tok", tmp_path / "teal", "--sparsity", "0.5",
              "--split-name", "all", "--seq-length", "32", "--calibration-tokens", "2048")
    ours, cfg = load_model(str(tmp_path / "teal"))
    tables = cfg.qsparse.calibration["thresholds"]
    kinds = {"q_proj": "qkv", "k_proj": "qkv", "v_proj": "qkv", "o_proj": "o",
             "gate_proj": "gate_up", "up_proj": "gate_up", "down_proj": "down"}
    hooks = []
    for name, mod in ref.named_modules():
        leaf = name.rsplit(".", 1)[-1]
        if leaf in kinds:
            layer = int(name.split("layers.")[1].split(".")[0])
            t = threshold_at(tables[f"layer{layer}/{kinds[leaf]}"], 0.5)
            hooks.append(mod.register_forward_pre_hook(
                lambda m, a, t=t: (a[0] * (a[0].abs() >= t),)))
    tokens = torch.randint(0, VOCAB, (2, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = ref(tokens).logits
        got = ours(tokens)[..., :VOCAB]
    for h in hooks:
        h.remove()
    torch.testing.assert_close(got, want, rtol=0, atol=1e-4)
    with torch.no_grad():
        dense = ref(tokens).logits
    assert (dense - want).abs().max() > 1e-2  # the thresholds do change the model
