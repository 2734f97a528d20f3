"""Mixture-of-experts FFN whose experts are the model's sparse MLPs; expert parallelism.

Routing, capacity, token dropping, the load-balancing loss and the expert-parallel all-to-all are
DeepSpeed's (:class:`deepspeed.moe.layer.MoE`: ``TopKGate`` + ``MOELayer``); DeepSpeed's engine
finds the layer, creates the expert-parallel groups (``ep_size_<EP>``) and reduces expert
gradients over the expert-data-parallel group (expert parameters carry ``allreduce=False`` and
``group_name``; the optimizer's parameter groups are split with
``split_params_into_different_moe_groups_for_optimizer``, see ``training/setup.py``).

What is ours:

* **Experts** are :class:`~megatron_qsparse.model.mlp.MLP` s, so Top-K / Block / BitNet
  apply inside them exactly as in the dense FFN. DeepSpeed's ``Experts`` deep-copies one expert
  (all identical); we replace its list with experts initialised from their *global* index
  (expert ``j`` from ``seed + j`` with ``seed`` drawn once from the caller's generator), so
  EP = 1 and EP = 2 start from the same weights and experts are not clones.
* **Empty capacity slots are skipped.** DeepSpeed hands every expert a ``[.., capacity, h]``
  buffer whose unused slots are zero rows. :class:`_Expert` runs the MLP on the occupied rows
  only (a row is empty iff it is all zero): the result is the same (every sparsifier works per
  token and unread slots are discarded), less work is done, and the experts' measured density
  counts real tokens only. (A routed token whose normalised input is exactly zero is treated as
  empty: output 0 instead of ``MLP(0)``, identical without ``--add-bias-linear``.)
* **Router z-loss** (not in DeepSpeed): ``mean(logsumexp(logits)²)`` of the router logits,
  recomputed from the gate's input (captured by a forward pre-hook on ``gate.wg``'s owner) with
  the same fp32 weights, so it is differentiable w.r.t. the router.
* **Statistics** for logging: tokens per expert (before capacity), the dropped fraction of
  (token, expert) routes, the aux and z losses; accumulated over a log interval.
* The router's input is dense unless ``--moe-router-sparsify-input`` (then the gate/up ratio).

How the auxiliary losses reach the training loss: ``model(tokens, labels)`` keeps returning the
pure per-token LM loss; every MoE layer keeps the losses of its latest forward, and
:func:`moe_aux_loss` sums ``aux_coeff · l_aux + z_coeff · l_z`` over the layers. The training loop
adds it to the mean LM loss before ``backward`` (``training/loop.py``); logged and evaluated
losses stay LM losses.

Not supported (rejected in ``config.validate``): tensor parallelism — our TP MLPs take a whole
input and do an exact TP-global top-K over the shards, while DeepSpeed's MoE under a TP ``mpu``
either drops the TP-duplicate tokens before the all-to-all (non-TP experts; every rank would then
need whole experts) or, with ``enable_expert_tensor_parallelism``, gathers tokens for experts
that split their own weights — neither matches a Column/RowParallel MLP whose top-K spans the
shards; pipeline parallelism — DeepSpeed's pipeline loss only sees the last stage's outputs, so
the routers' losses of other stages could not reach it; ZeRO-3 (DeepSpeed's MoE refuses it).
"""

from __future__ import annotations

import logging
import math

import torch
from torch import nn

from megatron_qsparse.config import ModelConfig, moe_layer_indices
from megatron_qsparse.model.mlp import MLP
from megatron_qsparse.parallel.state import ParallelState
from megatron_qsparse.sparsity import build_sparsifier

logger = logging.getLogger(__name__)


class _Expert(nn.Module):
    """One expert: an MLP applied to the occupied slots of its capacity buffer."""

    def __init__(self, mlp: nn.Module):
        super().__init__()
        self.mlp = mlp

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, x.shape[-1])
        rows = flat.detach().abs().amax(dim=-1).nonzero().squeeze(-1)
        if rows.numel() == flat.shape[0]:
            return self.mlp(x)
        out = flat.new_zeros(flat.shape)
        if rows.numel():
            out = out.index_copy(0, rows, self.mlp(flat.index_select(0, rows)).to(out.dtype))
        return out.view(x.shape)


class MoELayer(nn.Module):
    """The FFN of one MoE block: ``forward(x [b, s, h]) -> [b, s, h]``.

    With ``ep_size`` > 1 this rank holds experts ``ep_rank·E/ep .. (ep_rank+1)·E/ep - 1``.
    ``ep_rank`` defaults to ``rank % ep``: DeepSpeed's expert-parallel groups are runs of
    consecutive ranks (its default layout; TP = PP = 1 with MoE, so every rank is a data-parallel
    rank), and DeepSpeed names each expert's checkpoint file by the same global index.
    """

    def __init__(self, cfg: ModelConfig, layer: int,
                 parallel: ParallelState | None = None, ep_size: int = 1,
                 ep_rank: int | None = None):
        super().__init__()
        from deepspeed.moe.layer import MoE

        E, k = cfg.num_experts, cfg.moe_router_topk
        if ep_rank is None:
            ep_rank = (torch.distributed.get_rank() % ep_size
                       if ep_size > 1 and torch.distributed.is_initialized() else 0)
        self.layer, self.num_experts, self.topk = layer, E, k
        self.ep_size, self.ep_rank = ep_size, ep_rank
        self.num_local_experts = E // ep_size
        self.aux_coeff, self.z_coeff = cfg.moe_aux_loss_coeff, cfg.moe_z_loss_coeff
        self.top2_sampling = cfg.moe_top2_sampling
        self.min_capacity = cfg.moe_min_capacity
        policy = cfg.moe_token_drop_policy
        noisy = {"none": None, "jitter": "Jitter", "rsample": "RSample"}[cfg.moe_noisy_gate_policy]
        cap = cfg.moe_expert_capacity_factor
        self.moe = MoE(cfg.hidden_size, nn.Identity(), num_experts=E, ep_size=ep_size, k=k,
                       capacity_factor=cap,
                       eval_capacity_factor=cfg.moe_eval_capacity_factor or cap,
                       min_capacity=cfg.moe_min_capacity, noisy_gate_policy=noisy,
                       drop_tokens=policy != "none", use_rts=policy == "random",
                       top2_2nd_expert_sampling=cfg.moe_top2_sampling)
        gate = self.moe.deepspeed_moe.gate
        nn.init.normal_(gate.wg.weight, std=cfg.init_method_std)
        # global expert j from seed + j, whatever the expert-parallel split
        seed = int(torch.randint(0, 2**62, (1,)).item())
        experts = []
        for j in range(ep_rank * self.num_local_experts, (ep_rank + 1) * self.num_local_experts):
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed + j)
                experts.append(_Expert(MLP(cfg, layer, parallel)))
        holder = self.moe.deepspeed_moe.experts
        holder.deepspeed_experts = nn.ModuleList(experts)
        for p in holder.deepspeed_experts.parameters():
            p.allreduce = False  # DeepSpeed's marks of expert parameters
            p.group_name = self.moe.expert_group_name
            p.expert_parallel_size = ep_size  # other EP ranks hold as many different ones
        self.router_sparsifier = None
        if cfg.moe_router_sparsify_input:
            self.router_sparsifier = build_sparsifier(cfg.qsparse, "gate_up", layer).bind(
                cfg.hidden_size)
            self.router_sparsifier.kind = "router"  # its own density entry
        self._router_input: torch.Tensor | None = None
        gate.register_forward_pre_hook(self._capture_router_input)
        self.l_aux: torch.Tensor | None = None
        self.l_z: torch.Tensor | None = None
        self.reset_stats()

    def _capture_router_input(self, _module, args) -> None:
        self._router_input = args[0]

    def reset_stats(self) -> None:
        """Forget the statistics accumulated since the last reset."""
        self.stat_counts = torch.zeros(self.num_experts, dtype=torch.float64)
        self.stat_routes = 0.0  # (token, expert) routes asked for
        self.stat_dropped = 0.0  # routes over capacity
        self.stat_aux, self.stat_z, self.stat_steps = 0.0, 0.0, 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # DeepSpeed samples top-2's second expert (Gumbel noise) in evaluation too; ours only in
        # training (--moe-top2-sampling), so evaluation and generation route deterministically
        gate = self.moe.deepspeed_moe.gate
        gate.top2_2nd_expert_sampling = self.top2_sampling and self.training
        # DeepSpeed's top-1 gate refuses fewer tokens than --moe-min-capacity (e.g. one decoded
        # token); any capacity >= the token count drops nothing, so cap the minimum there: the
        # same routing and outputs as min_capacity itself
        gate.min_capacity = min(self.min_capacity, x.shape[0] * x.shape[1])
        router_x = None
        if self.router_sparsifier is not None:
            router_x = self.router_sparsifier(x)
        if router_x is None:
            out, l_aux, counts = self.moe(x)
        else:
            out, l_aux, counts = self._forward_sparse_router(x, router_x)
        logits_in = self._router_input
        self._router_input = None
        w = self.moe.deepspeed_moe.gate.wg.weight.float()
        logits = torch.nn.functional.linear(logits_in.float(), w)
        self.l_aux = l_aux
        self.l_z = torch.logsumexp(logits, dim=-1).square().mean()
        if self.training:  # evaluation does not enter the training statistics
            self._record(counts, x.shape[0] * x.shape[1], l_aux, self.l_z)
        return out

    def _forward_sparse_router(self, x, router_x):
        """The router sees ``router_x``, the experts ``x``: route on a sparsified copy by
        temporarily feeding the gate through a pre-hook swap."""
        gate = self.moe.deepspeed_moe.gate

        def swap(_m, args):
            return (router_x.reshape(-1, router_x.shape[-1]),) + tuple(args[1:])

        handle = gate.register_forward_pre_hook(swap)
        try:
            return self.moe(x)
        finally:
            handle.remove()
            self._router_input = router_x.reshape(-1, router_x.shape[-1])

    @torch.no_grad()
    def _record(self, counts: torch.Tensor, tokens: int, l_aux, l_z) -> None:
        counts = counts.detach().double().cpu()
        self.stat_counts += counts
        asked = float(tokens * self.topk)
        self.stat_routes += asked
        cap = self._capacity(tokens)
        if cap is not None:
            self.stat_dropped += float((counts - cap).clamp(min=0).sum())
        self.stat_aux += float(l_aux.detach())
        self.stat_z += float(l_z.detach())
        self.stat_steps += 1

    def _capacity(self, tokens: int) -> int | None:
        """DeepSpeed's expert capacity for ``tokens`` tokens (None: no dropping)."""
        gate = self.moe.deepspeed_moe.gate
        if not gate.drop_tokens:
            return None
        factor = gate.capacity_factor if self.training else gate.eval_capacity_factor
        cap = math.ceil((tokens / self.num_experts) * (factor * self.topk))
        return max(cap, self.min_capacity)

    def stats(self) -> dict:
        """``load`` (fraction of routes per expert), ``dropped`` (fraction of routes over
        capacity), mean ``aux`` and ``z`` loss since the last reset (empty if nothing ran)."""
        if not self.stat_steps:
            return {}
        total = float(self.stat_counts.sum()) or 1.0
        return {"load": (self.stat_counts / total).tolist(),
                "dropped": self.stat_dropped / max(self.stat_routes, 1.0),
                "aux": self.stat_aux / self.stat_steps, "z": self.stat_z / self.stat_steps}

    def kept_routes_fraction(self) -> float:
        """Measured fraction of (token, expert) routes an expert processed (1 - dropped)."""
        s = self.stats()
        return 1.0 - s["dropped"] if s else 1.0

    def loss(self) -> torch.Tensor | None:
        """``aux_coeff · l_aux + z_coeff · l_z`` of the latest forward (None before any)."""
        if self.l_aux is None:
            return None
        total = self.aux_coeff * self.l_aux
        if self.z_coeff:
            total = total + self.z_coeff * self.l_z
        return total


def moe_layers(model: nn.Module) -> list[MoELayer]:
    return [m for m in model.modules() if isinstance(m, MoELayer)]


def moe_aux_loss(model: nn.Module) -> torch.Tensor | None:
    """Sum of the weighted auxiliary losses of every MoE layer's latest forward (None for a dense
    model); add it to the LM loss before ``backward``."""
    losses = [l for l in (m.loss() for m in moe_layers(model)) if l is not None]
    if not losses:
        return None
    return torch.stack([l.float().reshape(()) for l in losses]).sum()


def moe_stats(model: nn.Module) -> dict[int, dict]:
    """``{layer index: MoELayer.stats()}`` of every MoE layer that ran since the last reset."""
    return {m.layer: s for m in moe_layers(model) if (s := m.stats())}


def reset_moe_stats(model: nn.Module) -> None:
    for m in moe_layers(model):
        m.reset_stats()


def build_ffn(cfg: ModelConfig, layer: int,
              parallel: ParallelState | None = None, ep_size: int = 1) -> nn.Module:
    """The FFN of block ``layer``: an :class:`MoELayer` where ``--moe-layer-freq`` puts one,
    else the dense :class:`~megatron_qsparse.model.mlp.MLP`."""
    if layer in moe_layer_indices(cfg):
        return MoELayer(cfg, layer, parallel, ep_size=ep_size)
    return MLP(cfg, layer, parallel)
