"""Tensor parallelism on 2 and 4 gloo ranks equals the single-process model.

Tolerances: fp32 ``rtol=1e-5, atol=1e-6`` (logits, per-token loss, every gathered gradient) —
the row-parallel all-reduce and the vocab-parallel loss add in another order than one matmul; fp64
``rtol=1e-10`` (fp32 tolerance for the L2-rescale and BitNet variants, whose scale and ``α`` the
method computes in fp32), where the sparsified inputs are also compared value for value and their
masks (which entries reach each matmul) element for element. In fp32 the masks are compared
element for element too, except entries that are exactly 0 on one side and rounding noise (below
1e-6 of the row's max) on the other: a value difference, not a selection difference. Layers fed
the same input have identical masks in fp32; the Top-K mask of the sharded row is also checked on
its own against ``topk_mask`` of the gathered row on tie-heavy data, bit for bit. Training: 4
AdamW steps, losses within ``rtol=1e-5``.
"""

from __future__ import annotations

import pytest

from tests.distributed import tp_bodies as B

pytestmark = pytest.mark.slow

WORLDS = [2, 4]


@pytest.mark.parametrize("n", WORLDS)
def test_topology_groups_and_mpu(dist_pool, n):
    out = dist_pool(n).run(B.check_topology, n // 2 if n == 4 else n, 1)
    for rank, r in enumerate(out):
        tp = n // 2 if n == 4 else n
        assert r["tp"] == (rank % tp, tp, [rank - rank % tp + i for i in range(tp)])
        dp = n // tp
        assert r["dp"][0:2] == (rank // tp, dp)
        assert r["dp"][2] == [rank % tp + tp * i for i in range(dp)]
        assert r["mp"] == r["tp"]  # PP = 1: model parallel = tensor parallel
        assert r["mpu"] == (rank % tp, tp, rank // tp, dp, rank % tp, tp, 0, 1, r["dp"][2], dp,
                            tp, tp)


def test_topology_with_pipeline_axis(dist_pool):
    out = dist_pool(4).run(B.check_topology, 2, 2)
    # axes (pipe, data, model): ranks 0,1 = stage 0 TP pair, 2,3 = stage 1
    assert [r["tp"][2] for r in out] == [[0, 1], [0, 1], [2, 3], [2, 3]]
    assert [r["pp"][2] for r in out] == [[0, 2], [1, 3], [0, 2], [1, 3]]
    assert [r["dp"][1] for r in out] == [1, 1, 1, 1]
    assert [r["mp"][1] for r in out] == [4, 4, 4, 4]


def test_impossible_topology_is_one_line_error(dist_pool):
    msgs = dist_pool(4).run(B.check_bad_topology, 3)
    assert all(m.startswith("--tensor-model-parallel-size: world size 4 is not divisible")
               for m in msgs), msgs


@pytest.mark.parametrize("n", WORLDS)
def test_global_topk_equals_topk_of_gathered_row(dist_pool, n):
    checked = dist_pool(n).run(B.check_global_topk, 100 + n)
    assert checked[0] == checked[-1] > 300


@pytest.mark.parametrize("n", WORLDS)
def test_mappings_forward_and_backward(dist_pool, n):
    assert all(dist_pool(n).run(B.check_mappings))


@pytest.mark.parametrize("n", WORLDS)
def test_vocab_parallel_embedding_and_cross_entropy(dist_pool, n):
    assert all(dist_pool(n).run(B.check_embedding_and_cross_entropy))


@pytest.mark.parametrize("variant", ["topk", "topk-no-ste", "topk-l2", "int8-topk",
                                     "block-2:4", "relu", "bitnet-topk", "none", "threshold",
                                     "threshold-int8"])
def test_layers_equal_single_process(dist_pool, variant):
    assert all(dist_pool(2).run(B.check_layers, variant))


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("variant", list(B.VARIANTS))
@pytest.mark.parametrize("n", WORLDS)
def test_model_equals_single_process(dist_pool, n, variant, dtype):
    out = dist_pool(n).run(B.check_model, variant, dtype)
    key = "mask_diffs" if dtype == "float64" else "significant_mask_diffs"
    assert all(r[key] == 0 for r in out), out


def test_dropout_rng_is_tp_aware(dist_pool):
    for r in dist_pool(2).run(B.check_dropout_rng, 5):
        assert r == {"same_hidden": True, "per_rank_differ": True, "replays": True}


@pytest.mark.parametrize("n,tp,variant", [(2, 2, "topk"), (2, 2, "int8-topk"), (4, 2, "topk"),
                                          (4, 4, "bitnet-topk")])
def test_training_steps_match_single_process(dist_pool, n, tp, variant):
    for per_step in dist_pool(n).run(B.check_training, variant, tp):
        for ref, got in per_step:
            assert got == pytest.approx(ref, rel=1e-5), per_step
