"""Test bodies for expert parallelism (run on every rank of a DistributedPool).

The reference is the single-process MoE layer (EP = 1, all experts) built in the same process
from the same seed: its experts have the EP = 2 layer's weights (experts are initialised from
their global index), and it is applied to the same rank's tokens (routing is per rank).
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from megatron_qsparse.config import ModelConfig, QSparseConfig
from megatron_qsparse.model.moe import MoELayer
from megatron_qsparse.parallel.state import ParallelState
from megatron_qsparse.parallel.utils import grad_norm
from megatron_qsparse.sparsity import collect_density


def _ds_comm() -> None:
    """DeepSpeed's comm layer on top of the pool's gloo group (its groups module uses it)."""
    import deepspeed

    deepspeed.init_distributed(dist_backend="gloo", auto_mpi_discovery=False, verbose=False)


def _layer(cfg, qcfg, ep: int, seed: int) -> MoELayer:
    torch.manual_seed(seed)
    layer = MoELayer(cfg.with_sparsity(qcfg), 0, ParallelState.single(), ep_size=ep).double()
    if ep > 1:
        layer.moe.set_deepspeed_parallelism()
    return layer


def _tokens(rank: int, h: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1000 + rank)
    x = torch.randn(2, 12, h, generator=g, dtype=torch.float64)
    w = torch.randn(2, 12, h, generator=g, dtype=torch.float64)  # loss = sum(out * w)
    return x, w


def ep_equivalence(k: int, policy: str, qmode: str, seed: int) -> dict:
    """EP = world vs EP = 1: outputs, aux / z losses, input, router and expert gradients.

    Returns the largest relative differences and this rank's dropped-route count."""
    _ds_comm()
    ep, rank = dist.get_world_size(), dist.get_rank()
    h = 16
    cfg = ModelConfig(num_layers=2, hidden_size=h, num_attention_heads=2, ffn_hidden_size=24,
                      num_experts=4, moe_router_topk=k, moe_token_drop_policy=policy,
                      moe_top2_sampling=False, moe_z_loss_coeff=1e-2, moe_min_capacity=2)
    qcfg = QSparseConfig(mode=qmode, ratio=0.5)
    par, ref = _layer(cfg, qcfg, ep, seed), _layer(cfg, qcfg, 1, seed)
    assert par.num_local_experts * ep == ref.num_local_experts == 4

    x, w = _tokens(rank, h)
    x_par = x.clone().requires_grad_(True)
    torch.manual_seed(555 + rank)  # random token selection draws: the same on both sides
    out = par(x_par)
    ((out * w).sum() + par.loss()).backward()

    # the reference on this rank's tokens: output, losses, input and router gradients
    x_ref = x.clone().requires_grad_(True)
    torch.manual_seed(555 + rank)
    out_ref = ref(x_ref)
    ((out_ref * w).sum() + ref.loss()).backward()
    diffs = {"out": _rel(out, out_ref), "aux": _rel(par.l_aux, ref.l_aux),
             "z": _rel(par.l_z, ref.l_z), "x_grad": _rel(x_par.grad, x_ref.grad)}
    g_par = par.moe.deepspeed_moe.gate.wg.weight.grad
    g_ref = ref.moe.deepspeed_moe.gate.wg.weight.grad
    diffs["router_grad"] = _rel(g_par, g_ref)
    dropped = ref.stat_dropped

    # experts see every rank's tokens routed to them: their gradients equal the reference's
    # summed over all ranks' tokens
    ref.zero_grad()
    for r in range(ep):
        xr, wr = _tokens(r, h)
        torch.manual_seed(555 + r)
        (ref(xr) * wr).sum().backward()
    local = range(rank * par.num_local_experts, (rank + 1) * par.num_local_experts)
    par_experts = par.moe.deepspeed_moe.experts.deepspeed_experts
    ref_experts = ref.moe.deepspeed_moe.experts.deepspeed_experts
    worst = 0.0
    for mine, j in zip(par_experts, local):
        for (name, p), (_, q) in zip(mine.named_parameters(), ref_experts[j].named_parameters()):
            assert torch.equal(p.detach(), q.detach()), f"expert {j} {name}: weights differ"
            worst = max(worst, _rel(p.grad, q.grad))
    diffs["expert_grad"] = worst
    # the gradient norm our fp32 ZeRO-0 optimizer clips with: experts summed over the EP group
    norm = grad_norm(list(par_experts.parameters()), ParallelState.single())
    ref_norm = torch.stack([q.grad.norm() for q in ref_experts.parameters()]).norm()
    diffs["expert_grad_norm"] = _rel(torch.tensor(norm, dtype=torch.float64), ref_norm)
    assert collect_density(par)["kind/gate_up"] <= (0.5 + 1e-9 if qmode == "topk" else 1.0)
    return {"diffs": diffs, "dropped": dropped}


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).abs().max() / b.abs().max().clamp(min=1e-30))
