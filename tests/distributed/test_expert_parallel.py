"""Expert parallelism on 2 gloo ranks equals the single-process MoE layer.

Each rank holds half of the 4 experts (EP = 2); tokens travel to their experts by DeepSpeed's
all-to-all. The reference (EP = 1, all experts, the same weights) is applied to the same rank's
tokens, since routing and capacity are computed per rank. Compared in fp64 with a relative
tolerance of 1e-10 (of each tensor's largest entry): the output, the aux and z losses, the input
and router gradients, and every expert's gradient (the reference's summed over both ranks'
tokens), and the experts' gradient norm our optimizer clips with (summed over the EP group).
Top-K sparsity (ratio 0.5) runs inside the experts.
"""

from __future__ import annotations

import pytest

from tests.distributed import moe_bodies as B

pytestmark = pytest.mark.slow

TOL = 1e-10


@pytest.mark.parametrize("k,policy,qmode", [(1, "position", "topk"), (2, "position", "topk"),
                                            (2, "none", "topk"), (1, "random", "none")])
def test_ep2_equals_ep1(dist_pool, k, policy, qmode):
    out = dist_pool(2).run(B.ep_equivalence, k, policy, qmode, 7)
    for rank, r in enumerate(out):
        for what, d in r["diffs"].items():
            assert d <= TOL, f"rank {rank} {what}: relative difference {d:.3g}"
    if policy == "position":  # capacity 1x: some routes are dropped, and dropped identically
        assert sum(r["dropped"] for r in out) > 0
