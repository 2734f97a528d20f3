"""Tiny random Hugging Face LLaMA / Mistral / Qwen2 models built locally (no download), and a
reference sparsified forward of them for the Q-Sparse import tests."""

from __future__ import annotations

import contextlib
import math

import torch

from tests.helpers import load_tool

VOCAB = 300  # divisible by 2 and 4: no padding rows at TP = 1, 2
BASE = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
            rms_norm_eps=1e-6)
ARCHS = {
    "llama": ("LlamaConfig", "LlamaForCausalLM", dict(rope_theta=5000.0)),
    "mistral": ("MistralConfig", "MistralForCausalLM", dict(rope_theta=20000.0)),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", dict(tie_word_embeddings=True,
                                                       rope_theta=1000000.0)),
}


def hf_class(arch: str):
    import transformers

    return getattr(transformers, ARCHS[arch][1])


def build_hf_model(arch: str, path: str, seed: int = 0):
    """Save a tiny random ``arch`` model to ``path`` and return it (fp32, eval mode). Norm weights
    and biases are perturbed so that a wrong mapping of them cannot go unnoticed."""
    import transformers

    conf_name, model_name, extra = ARCHS[arch]
    torch.manual_seed(seed)
    model = getattr(transformers, model_name)(getattr(transformers, conf_name)(**BASE, **extra))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name or name.endswith("bias"):
                p.add_(0.2 * torch.randn_like(p))
    model.eval()
    model.save_pretrained(path)
    return model


def converter():
    """``tools/checkpoint_convert.py`` as a module."""
    return load_tool("checkpoint_convert")


def reference_topk(x: torch.Tensor, ratio: float) -> torch.Tensor:
    """Keep the ``K = d - floor(S*d)`` largest |x| per row, ties to the lower index (written here
    independently of megatron_qsparse.sparsity: a stable descending sort)."""
    d = x.shape[-1]
    k = d - math.floor(ratio * d + 1e-9)
    idx = torch.sort(x.abs(), dim=-1, descending=True, stable=True).indices[..., :k]
    mask = torch.zeros_like(x, dtype=torch.bool).scatter_(-1, idx, True)
    return x * mask


@contextlib.contextmanager
def sparsified(model, ratio: float):
    """Pre-hooks on every q/k/v/o/gate/up/down Linear of a HF model that sparsify its input (the
    down projection's input is act(gate)*up, sparsified before down)."""
    names = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
    handles = []
    for name, mod in model.named_modules():
        if name.split(".")[-1] in names:
            handles.append(mod.register_forward_pre_hook(
                lambda m, args: (reference_topk(args[0], ratio),) + tuple(args[1:])))
    try:
        yield model
    finally:
        for h in handles:
            h.remove()
