"""Session-wide pools of gloo ranks (started on first use, reused by every test)."""

from __future__ import annotations

import pytest

from tests.distributed.harness import DistributedPool

_pools: dict[int, DistributedPool] = {}


@pytest.fixture(scope="session")
def dist_pool():
    """``dist_pool(n)``: the shared pool of ``n`` ranks."""

    def get(n: int) -> DistributedPool:
        if n not in _pools:
            _pools[n] = DistributedPool(n)
        return _pools[n]

    yield get
    for pool in _pools.values():
        pool.close()
    _pools.clear()
