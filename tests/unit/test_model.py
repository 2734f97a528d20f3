"""The LLaMA-style GPT model: shapes, causality, an independent dense reference, sparsity."""

import math

import pytest
import torch
import torch.nn.functional as F

from megatron_qsparse.config import ModelConfig, QSparseConfig
from megatron_qsparse.model import GPTModel, activated_parameters, count_parameters, flops_per_token
from megatron_qsparse.parallel import ColumnParallelLinear, RowParallelLinear
from megatron_qsparse.sparsity import (collect_density, keep_count, relu2_glu, reset_density,
                                       swiglu)

V = 96


def tiny(**kw) -> ModelConfig:
    base = dict(num_layers=2, hidden_size=32, num_attention_heads=4, seq_length=16,
                ffn_hidden_size=48)
    base.update(kw)
    return ModelConfig(**base)


def build(model_kw=None, q_kw=None, seed=0) -> GPTModel:
    torch.manual_seed(seed)
    return GPTModel(tiny(**(model_kw or {})).with_sparsity(QSparseConfig(**(q_kw or {}))), V)


def tokens(b=2, s=16, seed=1):
    return torch.randint(0, V, (b, s), generator=torch.Generator().manual_seed(seed))


# ---------------------------------------------------------------- independent dense reference


def reference_forward(model: GPTModel, toks: torch.Tensor) -> torch.Tensor:
    """Dense LLaMA forward written from scratch over the model's weights (complex-number RoPE,
    explicit causal softmax, repeated k/v heads)."""
    cfg = model.config
    sd = {k: v for k, v in model.state_dict().items()}
    nq, nkv = cfg.num_attention_heads, cfg.resolved_query_groups()
    hd, f = cfg.resolved_kv_channels(), cfg.resolved_ffn_hidden_size()
    b, s = toks.shape

    def rms(x, w):
        return w * x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + cfg.norm_epsilon)

    inv = 1.0 / cfg.rotary_base ** (torch.arange(0, hd, 2, dtype=torch.float64) / hd)
    rot = torch.polar(torch.ones(s, hd // 2, dtype=torch.float64),
                      torch.arange(s, dtype=torch.float64)[:, None] * inv)

    def rope(x):  # x [b, heads, s, hd]; pairs (j, j + hd/2)
        z = torch.complex(x[..., :hd // 2].double(), x[..., hd // 2:].double()) * rot
        return torch.cat([z.real, z.imag], dim=-1).to(x.dtype)

    act = {"swiglu": lambda g, u: g * torch.sigmoid(g) * u,
           "relu2_glu": lambda g, u: u * torch.clamp(g, min=0) ** 2}[cfg.ffn_type]
    h = sd["embedding.weight"][toks]
    causal = torch.ones(s, s, dtype=torch.bool).tril()
    for i in range(cfg.num_layers):
        p = f"layers.{i}."
        x = rms(h, sd[p + "input_norm.weight"])
        qkv = x @ sd[p + "attention.qkv.weight"].T
        q = qkv[..., :nq * hd].view(b, s, nq, hd).transpose(1, 2)
        k = qkv[..., nq * hd:(nq + nkv) * hd].view(b, s, nkv, hd).transpose(1, 2)
        v = qkv[..., (nq + nkv) * hd:].view(b, s, nkv, hd).transpose(1, 2)
        q, k = rope(q), rope(k)
        k, v = k.repeat_interleave(nq // nkv, 1), v.repeat_interleave(nq // nkv, 1)
        att = (q @ k.transpose(-1, -2)) / math.sqrt(hd)
        att = att.masked_fill(~causal, float("-inf")).softmax(-1)
        y = (att @ v).transpose(1, 2).reshape(b, s, nq * hd)
        h = h + y @ sd[p + "attention.o.weight"].T
        x = rms(h, sd[p + "post_attention_norm.weight"])
        gu = x @ sd[p + "mlp.gate_up.weight"].T
        h = h + act(gu[..., :f], gu[..., f:]) @ sd[p + "mlp.down.weight"].T
    h = rms(h, sd["final_norm.weight"])
    return h @ sd["embedding.weight"].T


@pytest.mark.parametrize("ffn_type", ["swiglu", "relu2_glu"])
@pytest.mark.parametrize("groups", [None, 2, 1])
def test_dense_model_matches_reference(ffn_type, groups):
    model = build({"ffn_type": ffn_type, "num_query_groups": groups}, {"mode": "none"}).double()
    t = tokens()
    torch.testing.assert_close(model(t), reference_forward(model, t), rtol=1e-6, atol=1e-6)


def test_groups_equal_heads_is_mha():
    t = tokens()
    a = build({"num_query_groups": 4})
    b = build({"num_query_groups": None})
    assert torch.equal(a(t), b(t))


# ---------------------------------------------------------------- shapes, causality, loss


def test_shapes_and_loss_is_fp32_cross_entropy():
    model = build()
    t, labels = tokens(3, 10), tokens(3, 10, seed=2)
    logits = model(t)
    assert logits.shape == (3, 10, V)
    loss = model(t, labels)
    assert loss.shape == (3, 10) and loss.dtype == torch.float32
    ref = F.cross_entropy(logits.flatten(0, 1), labels.flatten(), reduction="none").view(3, 10)
    torch.testing.assert_close(loss, ref)


def test_causal():
    model = build()
    t = tokens(1, 16)
    t2 = t.clone()
    t2[0, 10] = (t2[0, 10] + 1) % V
    a, b = model(t), model(t2)
    assert torch.equal(a[:, :10], b[:, :10])
    assert not torch.allclose(a[:, 10:], b[:, 10:])


def test_tied_and_untied():
    tied, untied = build(), build({"untie_embeddings_and_output_weights": True})
    assert tied.output_layer is None and tied.output_weight() is tied.embedding.weight
    assert count_parameters(untied) - count_parameters(tied) == V * 32
    non_emb = count_parameters(tied, non_embedding=True)
    assert non_emb == count_parameters(untied, non_embedding=True)
    t = tokens()
    before = untied(t)
    with torch.no_grad():
        untied.output_layer.weight.mul_(2)
    assert torch.allclose(untied(t), before * 2, atol=1e-5)
    assert "output_layer.weight" in untied.state_dict()
    assert "output_layer.weight" not in tied.state_dict()


def test_init_is_deterministic_and_scaled():
    a, b = build(seed=3), build(seed=3)
    for (n, p), q in zip(a.named_parameters(), b.parameters()):
        assert torch.equal(p, q), n
    big = build({"num_layers": 8, "hidden_size": 256, "ffn_hidden_size": 512}, seed=0)
    layer = big.layers[0]
    assert layer.attention.qkv.weight.std().item() == pytest.approx(0.02, rel=0.05)
    assert layer.mlp.down.weight.std().item() == pytest.approx(0.02 / 4, rel=0.05)
    assert layer.attention.o.weight.std().item() == pytest.approx(0.02 / 4, rel=0.05)
    assert torch.equal(layer.input_norm.weight, torch.ones(256))


def test_layernorm_bias_and_bf16_run():
    model = build({"normalization": "LayerNorm", "add_bias_linear": True})
    assert model(tokens()).isfinite().all()
    model = build().to(torch.bfloat16)
    out = model(tokens(), tokens(seed=3))
    assert out.dtype == torch.float32 and out.isfinite().all()


@pytest.mark.parametrize("q_kw", [{"mode": "none"}, {"ratio": 0.5}, {"mode": "block"},
                                  {"ratio": 0.5, "ste": False}])
def test_sgd_step_lowers_loss(q_kw):
    model = build(q_kw=q_kw)
    t, labels = tokens(4, 16), tokens(4, 16, seed=5)
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    loss0 = model(t, labels).mean()
    loss0.backward()
    opt.step()
    with torch.no_grad():
        assert model(t, labels).mean() < loss0


# ---------------------------------------------------------------- sparsity in the model


@pytest.mark.parametrize("granularity", ["full", "selective"])
def test_recompute_gives_the_same_loss_and_gradients(granularity):
    """Activation recomputation changes memory, not numerics (dropout included: the replay
    draws the same masks)."""
    grads = {}
    for g in (None, granularity):
        torch.manual_seed(0)
        model = GPTModel(tiny(recompute_granularity=g, hidden_dropout=0.1,
                              attention_dropout=0.1), V)
        torch.manual_seed(5)
        loss = model(tokens(), tokens(seed=2)).mean()
        loss.backward()
        grads[g] = (loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()})
    (l0, g0), (l1, g1) = grads[None], grads[granularity]
    assert torch.equal(l0, l1)
    for name in g0:
        torch.testing.assert_close(g1[name], g0[name], rtol=1e-6, atol=1e-8, msg=name)


def test_init_seed_seeds_every_piece_independently():
    """With ``init_seed``, block i's weights do not depend on how many pieces were built before
    it (what lets every pipeline stage build only its own blocks)."""
    a = GPTModel(tiny(num_layers=2), V, init_seed=7)
    b = GPTModel(tiny(num_layers=3), V, init_seed=7)
    torch.manual_seed(123)
    c = GPTModel(tiny(num_layers=2), V, init_seed=7)
    for name, p in a.state_dict().items():
        assert torch.equal(p, c.state_dict()[name]), name
        if name.startswith(("embedding", "layers.0", "layers.1")):
            other = b.state_dict()[name]
            if name.endswith(("o.weight", "down.weight")):  # std / sqrt(2 L): same draws, scaled
                other = other * math.sqrt(3 / 2)
            torch.testing.assert_close(p, other, rtol=1e-6, atol=0, msg=name)
    assert not torch.equal(a.layers[0].attention.qkv.weight, a.layers[1].attention.qkv.weight)


def test_activations():
    g, u = torch.tensor([-1.0, 0.0, 2.0]), torch.tensor([3.0, 4.0, 5.0])
    assert torch.equal(relu2_glu(g, u), torch.tensor([0.0, 0.0, 20.0]))
    torch.testing.assert_close(swiglu(g, u), F.silu(g) * u)


def test_measured_density_is_exact_k_over_d_per_projection():
    ratios = {"qkv_ratio": 0.1, "o_ratio": 0.25, "gate_up_ratio": 0.5, "down_ratio": 0.7}
    model = build({"ffn_type": "swiglu"}, {"ratio": 0.4, **ratios})
    reset_density(model)
    model(tokens())
    d = collect_density(model)
    widths = {"qkv": 32, "o": 32, "gate_up": 32, "down": 48}
    for kind, width in widths.items():
        k = keep_count(width, ratios[f"{kind}_ratio"])
        assert d[f"kind/{kind}"] == k / width
        for i in range(2):
            assert d[f"layer{i}/{kind}"] == k / width
    # the down input of relu2_glu has natural zeros: never denser than k/d
    model = build({"ffn_type": "relu2_glu"}, {"ratio": 0.4})
    model(tokens())
    assert collect_density(model)["kind/down"] <= keep_count(48, 0.4) / 48


def test_activated_parameters_and_flops():
    model = build({"ffn_type": "swiglu"}, {"ratio": 0.5})
    model(tokens())
    density = collect_density(model)
    proj = sum(m.weight.numel() for m in model.modules()
               if isinstance(m, (ColumnParallelLinear, RowParallelLinear)))
    norms = count_parameters(model, non_embedding=True) - proj
    assert activated_parameters(model, density) == pytest.approx(0.5 * proj + norms)
    assert activated_parameters(model, None) == count_parameters(model, non_embedding=True)
    cfg = model.config
    dense = flops_per_token(cfg, V, 16)
    assert dense == 6 * (proj + V * 32) + 12 * 2 * 16 * 32
    assert flops_per_token(cfg, V, 16, density) == 6 * (0.5 * proj + V * 32) + 12 * 2 * 16 * 32


def test_bitnet_forward_and_grads():
    model = build(q_kw={"bitnet": True, "ratio": 0.4})
    loss = model(tokens(), tokens(seed=4)).mean()
    assert loss.isfinite()
    loss.backward()
    for n, p in model.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, n
    w = model.layers[0].mlp.down.weight
    from megatron_qsparse.sparsity import ternary_weight
    assert len(torch.unique(ternary_weight(w).detach())) == 3
