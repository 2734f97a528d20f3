"""Hugging Face models imported at TP = 2 give transformers' logits (fp32, within 1e-4), dense
and with Top-K against the reference sparsified HF forward (tests/hf_models.py)."""

from __future__ import annotations

import pytest

from tests.distributed import convert_bodies as B
from tests.hf_models import build_hf_model, converter

pytestmark = pytest.mark.slow


@pytest.mark.parametrize("arch,ratio", [("llama", None), ("qwen2", None), ("mistral", 0.4)])
def test_tp2_import_matches_transformers(dist_pool, tmp_path, arch, ratio):
    hf_dir = str(tmp_path / arch)
    build_hf_model(arch, hf_dir)
    extra = [] if ratio is None else ["--qsparse-mode", "topk", "--qsparse-ratio", str(ratio)]
    assert converter().main(["import-hf", "--hf-dir", hf_dir, "--save", str(tmp_path / "ck"),
                             "--target-tensor-parallel-size", "2", *extra]) == 0
    diffs = dist_pool(2).run(B.imported_logits_vs_transformers, str(tmp_path / "ck"), hf_dir,
                             arch, ratio)
    assert max(diffs) < 1e-4, diffs
