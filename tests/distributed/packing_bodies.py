"""Test bodies for packed sequences under tensor parallelism (see test_packing_tp.py)."""

from __future__ import annotations

import torch

from megatron_qsparse.parallel.sharding import gather_model_state_dict
from tests.distributed.tp_bodies import TOL, V, build_pair, world


def packed_inputs(b: int = 2, s: int = 16, seed: int = 7):
    """Random tokens and labels in documents of random lengths: ``(tokens, labels,
    position_ids, segment_ids)``; the target after each document's last token is -100."""
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, V, (b, s), generator=g)
    labels = torch.randint(0, V, (b, s), generator=g)
    starts = torch.rand(b, s, generator=g) < 0.25
    starts[:, 0] = True
    segment_ids = starts.long().cumsum(-1) - 1
    idx = torch.arange(s).expand(b, s)
    position_ids = idx - torch.cummax(torch.where(starts, idx, 0), dim=-1).values
    labels[:, :-1][starts[:, 1:]] = -100
    return tokens, labels, position_ids, segment_ids


def check_packed_model(variant: str, dtype_name: str) -> bool:
    """Logits, per-token loss and every gathered gradient of the TP model on a packed batch
    (position and segment ids) equal the single-process model's."""
    dtype = getattr(torch, dtype_name)
    ref, tpm, st, _ = build_pair(variant, world(), dtype)
    tokens, labels, pos, seg = packed_inputs()
    tol = TOL[dtype]
    kw = dict(position_ids=pos, segment_ids=seg)
    torch.testing.assert_close(tpm(tokens, **kw), ref(tokens, **kw), **tol)
    loss_ref, loss = ref(tokens, labels, **kw), tpm(tokens, labels, **kw)
    torch.testing.assert_close(loss, loss_ref, **tol)
    assert not torch.equal(loss_ref, ref(tokens, labels))  # the documents do change the loss
    loss_ref.sum().backward()
    loss.sum().backward()
    grads = gather_model_state_dict(tpm, st, grads=True)
    for name, p in ref.named_parameters():
        torch.testing.assert_close(grads[name], p.grad, **tol, msg=lambda m, n=name: f"{n}: {m}")
    return True
