"""MoE: configuration errors, the layer's losses and statistics, experts' initialisation and
empty-slot skipping, density pooling, and the parameter / FLOP accounting of routed experts."""

from __future__ import annotations

import math

import pytest
import torch

from megatron_qsparse.arguments import parse
from megatron_qsparse.config import ModelConfig, QSparseConfig, moe_layer_indices
from megatron_qsparse.model.accounting import (activated_parameters, count_parameters,
                                               flops_per_token, projection_shapes)
from megatron_qsparse.model.gpt import GPTModel
from megatron_qsparse.model.moe import MoELayer, _Expert, moe_aux_loss, moe_layers, moe_stats
from megatron_qsparse.model.mlp import MLP
from megatron_qsparse.parallel.state import ParallelState
from megatron_qsparse.sparsity import collect_density
from megatron_qsparse.training.optim import param_groups

BASE = ["--data-path", "data/x_text_document", "--tokenizer-type", "ByteTokenizer"]


@pytest.mark.parametrize("argv,world,needle", [
    (["--num-experts", "4", "--expert-model-parallel-size", "3"], None,
     "--expert-model-parallel-size: 4 experts do not split over 3"),
    (["--expert-model-parallel-size", "2"], None,
     "--expert-model-parallel-size: expert parallelism needs experts"),
    (["--num-experts", "4", "--expert-model-parallel-size", "2"], 3,
     "--expert-model-parallel-size: data-parallel size 3 is not divisible by 2"),
    (["--num-experts", "4", "--tensor-model-parallel-size", "2"], 2,
     "--tensor-model-parallel-size: MoE layers do not support tensor parallelism"),
    (["--num-experts", "4", "--pipeline-model-parallel-size", "2"], 2,
     "--pipeline-model-parallel-size: MoE layers do not support pipeline parallelism"),
    (["--num-experts", "4", "--recompute-granularity", "full"], None,
     "--recompute-granularity: full recomputation re-runs the routers"),
    (["--num-experts", "4", "--moe-token-drop-policy", "random"], None,
     "--moe-token-drop-policy: random token selection is top-1 only"),
    (["--num-experts", "4", "--zero-stage", "3"], None,
     "--zero-stage: DeepSpeed's MoE does not support ZeRO-3"),
    (["--num-experts", "1"], None, "--num-experts: got 1"),
    (["--num-experts", "4", "--moe-expert-capacity-factor", "0"], None,
     "--moe-expert-capacity-factor: got 0"),
])
def test_bad_moe_settings_are_one_line_errors(capsys, argv, world, needle):
    with pytest.raises(SystemExit):
        parse([*BASE, *argv], world_size=world)
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert needle in err, err


def test_moe_layer_freq_picks_blocks():
    assert moe_layer_indices(ModelConfig(num_layers=4)) == []
    assert moe_layer_indices(ModelConfig(num_layers=4, num_experts=2)) == [0, 1, 2, 3]
    assert moe_layer_indices(ModelConfig(num_layers=5, num_experts=2, moe_layer_freq=2)) == [0, 2, 4]


def cfg(**kw) -> ModelConfig:
    base = dict(num_layers=2, hidden_size=32, num_attention_heads=4, ffn_hidden_size=48,
                seq_length=16, num_experts=4, moe_router_topk=2, moe_top2_sampling=False)
    base.update(kw)
    return ModelConfig(**base)


def test_experts_differ_and_follow_their_global_index():
    """Expert j has the same weights whatever the EP split (EP rank 1 of 2 holds experts 2, 3),
    and experts are not copies of each other."""
    c, q = cfg(), QSparseConfig()
    torch.manual_seed(0)
    full = MoELayer(c.with_sparsity(q), 0, ParallelState.single(), ep_size=1)
    torch.manual_seed(0)
    half = MoELayer(c.with_sparsity(q), 0, ParallelState.single(), ep_size=2, ep_rank=1)
    fe = full.moe.deepspeed_moe.experts.deepspeed_experts
    he = half.moe.deepspeed_moe.experts.deepspeed_experts
    assert len(fe) == 4 and len(he) == 2
    for mine, j in zip(he, (2, 3)):
        assert torch.equal(mine.mlp.gate_up.weight, fe[j].mlp.gate_up.weight)
        assert torch.equal(mine.mlp.down.weight, fe[j].mlp.down.weight)
    assert not torch.equal(fe[0].mlp.gate_up.weight, fe[1].mlp.gate_up.weight)
    assert torch.equal(half.moe.deepspeed_moe.gate.wg.weight, full.moe.deepspeed_moe.gate.wg.weight)
    for p in he.parameters():  # DeepSpeed's marks of expert parameters
        assert p.allreduce is False and p.group_name == "ep_size_2" and p.expert_parallel_size == 2


def test_expert_skips_empty_slots_exactly():
    """A capacity buffer with empty (zero) slots: the occupied rows get exactly the MLP's output,
    empty ones 0, and the measured density counts the occupied rows only."""
    torch.manual_seed(1)
    mlp = MLP(cfg().with_sparsity(QSparseConfig(ratio=0.5)), 0).double()
    expert = _Expert(mlp)
    x = torch.randn(2, 6, 32, dtype=torch.float64)
    x[0, 4:] = 0
    x[1, 1] = 0
    y = expert(x)
    occupied = x.abs().amax(-1) > 0
    assert torch.equal(y[~occupied], torch.zeros_like(y[~occupied]))
    torch.testing.assert_close(y[occupied], mlp(x[occupied]), rtol=1e-12, atol=1e-12)
    assert collect_density(expert)["kind/gate_up"] == pytest.approx(0.5)


def test_aux_and_z_losses_reach_the_router_and_are_logged():
    torch.manual_seed(2)
    c = cfg(moe_aux_loss_coeff=0.5, moe_z_loss_coeff=0.25)
    model = GPTModel(c, 64)
    tokens = torch.randint(0, 64, (2, 16))
    loss = model(tokens, tokens).mean()
    aux = moe_aux_loss(model)
    layers = moe_layers(model)
    assert len(layers) == 2
    expected = sum(0.5 * m.l_aux + 0.25 * m.l_z for m in layers)
    torch.testing.assert_close(aux, expected)
    # z-loss: mean logsumexp^2 of the router logits of the block's normalised input
    m0 = layers[0]
    h = model.layers[0].attention(model.layers[0].input_norm(model.embedding(tokens)))
    x = model.layers[0].post_attention_norm(model.embedding(tokens) + h)
    logits = x.reshape(-1, 32) @ m0.moe.deepspeed_moe.gate.wg.weight.t()
    torch.testing.assert_close(m0.l_z, torch.logsumexp(logits, -1).square().mean())
    # the aux losses alone give the router a gradient
    aux.backward()
    assert m0.moe.deepspeed_moe.gate.wg.weight.grad.abs().sum() > 0
    stats = moe_stats(model)
    assert sorted(stats) == [0, 1]
    for s in stats.values():
        assert len(s["load"]) == 4 and sum(s["load"]) == pytest.approx(1.0)
        assert 0.0 <= s["dropped"] < 1.0
    del loss


def test_dropped_fraction_matches_capacity():
    """Capacity factor 0.25 (top-1, 32 tokens, 4 experts): each expert keeps at most
    max(ceil(32/4 * 0.25), min capacity 1) = 2 tokens, so at least 32 - 8 routes are dropped."""
    torch.manual_seed(3)
    c = cfg(moe_router_topk=1, moe_expert_capacity_factor=0.25, moe_min_capacity=1)
    layer = MoELayer(c, 0, ParallelState.single())
    layer(torch.randn(2, 16, 32))
    s = layer.stats()
    assert s["dropped"] == pytest.approx(1 - sum(min(n, 2) for n in layer.stat_counts) / 32)
    assert s["dropped"] >= 24 / 32


def test_density_of_experts_is_pooled_per_layer():
    torch.manual_seed(4)
    model = GPTModel(cfg().with_sparsity(QSparseConfig(ratio=0.5)), 64)
    model(torch.randint(0, 64, (2, 16)))
    d = collect_density(model)
    assert d["layer0/gate_up"] == pytest.approx(0.5)
    assert 0 < d["layer0/down"] <= 0.5 + 1e-9


def test_parameter_and_flop_accounting():
    c, q = cfg(num_layers=2, moe_layer_freq=2), QSparseConfig(ratio=0.5)
    torch.manual_seed(5)
    one = GPTModel(c.with_sparsity(q), 64)
    torch.manual_seed(5)
    half = GPTModel(c.with_sparsity(q), 64, expert_parallel_size=2)  # EP rank 0 of 2: half the experts here
    assert count_parameters(half) == count_parameters(one)
    dense = GPTModel(cfg(num_experts=None).with_sparsity(q), 64)
    ffn = 32 * 96 + 48 * 32  # gate_up + down of one expert
    # block 0 has 4 experts and a 32x4 router instead of one FFN
    assert count_parameters(one) == count_parameters(dense) + 3 * ffn + 32 * 4
    # activated: 2 of 4 experts (no drops yet), projections at density 0.5, norms and router full
    act_dense = activated_parameters(dense, 0.5)
    assert activated_parameters(one, 0.5) == pytest.approx(act_dense + 0.5 * ffn + 32 * 4)
    assert activated_parameters(half, 0.5) == pytest.approx(activated_parameters(one, 0.5))
    # FLOPs: block 0's FFN counts k = 2 experts, plus the router
    f_dense = flops_per_token(cfg(num_experts=None), 64, 16, 0.5)
    shapes = projection_shapes(c)
    extra = 0.5 * sum(i * o for k, (i, o) in shapes.items() if k in ("gate_up", "down"))
    assert flops_per_token(c, 64, 16, 0.5) == pytest.approx(f_dense + 6 * (extra + 32 * 4))
    assert math.isfinite(flops_per_token(c, 64, 16))


def test_optimizer_groups_split_expert_parameters():
    torch.manual_seed(6)
    model = GPTModel(cfg(), 64)
    groups = param_groups(model, 0.1)
    moe = [g for g in groups if g.get("moe")]
    expert_ids = {id(p) for m in moe_layers(model)
                  for p in m.moe.deepspeed_moe.experts.parameters()}
    assert {id(p) for g in moe for p in g["params"]} == expert_ids
    assert all(g["name"] == "ep_size_1" for g in moe)
    assert sum(len(g["params"]) for g in groups) == len(list(model.parameters()))


def test_router_input_is_dense_unless_asked():
    """By default the router sees the dense input; with --moe-router-sparsify-input the top-K
    sparsified one (gate/up ratio), measured as its own density entry ``router``."""
    from megatron_qsparse.sparsity import topk_sparsify
    from megatron_qsparse.sparsity import keep_count

    x = torch.randn(2, 16, 32)
    for sparsify in (False, True):
        torch.manual_seed(7)
        layer = MoELayer(cfg(moe_router_sparsify_input=sparsify).with_sparsity(QSparseConfig(ratio=0.5)), 0,
                         ParallelState.single())
        layer(x)
        seen = topk_sparsify(x, keep_count(32, 0.5)) if sparsify else x
        w = layer.moe.deepspeed_moe.gate.wg.weight
        expected = torch.logsumexp(seen.reshape(-1, 32) @ w.t(), -1).square().mean()
        torch.testing.assert_close(layer.l_z, expected)
        d = collect_density(layer)
        assert ("layer0/router" in d) == sparsify
        if sparsify:
            assert d["layer0/router"] == pytest.approx(0.5)


def test_describe_counts_every_expert():
    from megatron_qsparse.model.accounting import describe

    c = cfg(num_layers=2, moe_layer_freq=2, hidden_size=256, ffn_hidden_size=512)
    torch.manual_seed(8)
    model = GPTModel(c, 64)
    line = describe(c, 64)
    assert "4 experts (top-2) in 1 blocks" in line
    proj = count_parameters(model, non_embedding=True) - sum(
        p.numel() for n, p in model.named_parameters() if "norm" in n)
    assert proj > 2e6 and f"{proj / 1e6:.1f}M projection params" in line


def test_top2_samples_its_second_expert_in_training_only():
    """DeepSpeed adds Gumbel noise to top-2's second choice in evaluation too; ours routes
    deterministically there (evaluation and generation repeat), and samples only in training."""
    c = cfg(moe_top2_sampling=True)
    torch.manual_seed(0)
    layer = MoELayer(c.with_sparsity(QSparseConfig()), 0, ParallelState.single())
    x = torch.randn(2, 8, c.hidden_size)
    layer.eval()
    with torch.no_grad():
        outs = [layer(x) for _ in range(4)]
    assert all(torch.equal(o, outs[0]) for o in outs)
    assert not layer.moe.deepspeed_moe.gate.top2_2nd_expert_sampling
    layer.train()
    with torch.no_grad():
        trained = [layer(x) for _ in range(4)]
    assert layer.moe.deepspeed_moe.gate.top2_2nd_expert_sampling
    assert any(not torch.equal(t, trained[0]) for t in trained)  # the second expert varies


@pytest.mark.parametrize("k", [1, 2])
def test_fewer_tokens_than_the_min_capacity_route_without_drops(k):
    """One decoded token under --moe-min-capacity 4 (DeepSpeed's top-1 gate asserts on it):
    the output is each token's own mixture, as in a batch with room for every route."""
    c = cfg(moe_router_topk=k, moe_min_capacity=4, moe_expert_capacity_factor=1.0)
    torch.manual_seed(0)
    layer = MoELayer(c.with_sparsity(QSparseConfig()), 0, ParallelState.single()).eval()
    x = torch.randn(1, 3, c.hidden_size)
    with torch.no_grad():
        alone = torch.cat([layer(x[:, t:t + 1]) for t in range(3)], dim=1)
        layer.min_capacity = 64  # capacity for all 3 tokens at once: nothing dropped
        together = layer(x)
    assert torch.allclose(alone, together, atol=1e-6)
    assert layer.moe.deepspeed_moe.gate.min_capacity == 3
