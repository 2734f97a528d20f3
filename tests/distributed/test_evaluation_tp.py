"""Perplexity of a TP = 2 checkpoint evaluated with one shard per rank equals the single-process
evaluation of its merged weights (fp32, relative 1e-5: the TP reductions add in another order)."""

from __future__ import annotations

import numpy as np
import pytest

from megatron_qsparse.evaluation import load_for_eval, sliding_window_nll
from tests.distributed import eval_bodies as B
from tests.eval_checkpoint import tiny_config, write_checkpoint

pytestmark = pytest.mark.slow


def test_tp2_sharded_perplexity_equals_merged_single_process(dist_pool, tmp_path):
    write_checkpoint(str(tmp_path), tiny_config(tp=2))
    stream = np.random.default_rng(3).integers(0, 4000, size=90).tolist()
    ref = sliding_window_nll(load_for_eval(str(tmp_path)).model, stream, 32, 16)
    out = dist_pool(2).run(B.tp_perplexity, str(tmp_path), stream, 32, 16)
    for r in out:
        assert r["shard_rows"] == 4096 // 2  # each rank holds its half of the vocabulary
        assert r["tokens"] == ref.tokens == 89
        assert r["nll"] == pytest.approx(ref.nll_sum, rel=1e-5)
        for k, v in ref.density.items():
            assert r["density"][k] == pytest.approx(v, abs=1e-9), k
