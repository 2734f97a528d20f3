"""BitNet b1.58 ternary weights and int8 activations."""

import torch

from megatron_qsparse.sparsity import int8_activation, quantize_int8, ternary_weight


def test_ternary_values_and_alpha():
    w = torch.randn(32, 16)
    q = ternary_weight(w)
    alpha = w.abs().double().mean().float()  # accumulated in fp64 (split-invariant under TP)
    vals = set(torch.unique(q / alpha).round().tolist())
    assert vals <= {-1.0, 0.0, 1.0} and len(vals) == 3
    assert torch.allclose(q.abs().unique(), torch.stack([torch.tensor(0.0), alpha]))
    expected = (w / (alpha + 1e-5)).round().clamp(-1, 1) * alpha
    assert torch.equal(q, expected)


def test_ternary_hand_example():
    w = torch.tensor([[0.1, -0.2, 0.6, -1.1]])  # alpha = 0.5
    assert torch.allclose(ternary_weight(w, eps=0.0), torch.tensor([[0.0, -0.0, 0.5, -0.5]]))


def test_ternary_ste_gradient():
    w = torch.randn(8, 8, requires_grad=True)
    g = torch.randn(8, 8)
    ternary_weight(w).backward(g)
    assert torch.equal(w.grad, g)


def test_ternary_keeps_dtype():
    w = torch.randn(8, 8, dtype=torch.bfloat16)
    assert ternary_weight(w).dtype == torch.bfloat16


def test_int8_activation_is_absmax_int8_with_ste():
    x = torch.randn(4, 32, requires_grad=True)
    y = int8_activation(x)
    assert torch.equal(y, quantize_int8(x))
    y.sum().backward()
    assert torch.equal(x.grad, torch.ones_like(x))
