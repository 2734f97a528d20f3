"""Evaluation bodies run on every rank of a DistributedPool (see harness.py)."""

from __future__ import annotations

from megatron_qsparse.evaluation import load_for_eval, sliding_window_nll
from tests.distributed.tp_bodies import state


def tp_perplexity(ckpt: str, stream: list[int], seq: int, stride: int) -> dict:
    """Perplexity of a TP checkpoint with one shard per rank (TP = world size)."""
    import torch

    st = state(torch.distributed.get_world_size())
    em = load_for_eval(ckpt, parallel=st)
    assert em.checkpoint_tp == st.tp_size
    r = sliding_window_nll(em.model, stream, seq, stride, batch_size=2)
    return {"nll": r.nll_sum, "tokens": r.tokens, "density": r.density,
            "shard_rows": em.model.embedding.weight.shape[0]}
