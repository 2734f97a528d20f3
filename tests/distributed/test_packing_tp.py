"""Packed sequences (position ids restarting per document, attention within documents) under
tensor parallelism on 2 and 4 gloo ranks equal the single-process model: logits, per-token loss
and every gathered gradient, fp32 ``rtol=1e-5, atol=1e-6`` and fp64 ``rtol=1e-10`` (the
tolerances of test_tensor_parallel.py). The mask is built from the same segment ids on every
rank; each rank attends with its own heads."""

from __future__ import annotations

import pytest

from tests.distributed import packing_bodies as B

pytestmark = pytest.mark.slow


CASES = [(2, "topk", "float32"), (2, "topk", "float64"),
         (4, "topk-swiglu-bias-untied", "float32")]


@pytest.mark.parametrize("n,variant,dtype", CASES, ids=[f"tp{n}-{v}-{d}" for n, v, d in CASES])
def test_packed_model_equals_single_process(dist_pool, n, variant, dtype):
    assert all(dist_pool(n).run(B.check_packed_model, variant, dtype))
