"""Autoregressive generation with a KV cache: greedy, temperature and nucleus (top-p) sampling.

One prefill call runs the prompt (dense matmuls on the sparsified inputs, batched over the
prompt), then each new token is one decode call of one position (the sparse GEMV path). The decode
loop reuses one preallocated cache and one token buffer, runs under ``torch.inference_mode`` and
computes logits for the last position only, so per-token Python work is the model's own.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable

import torch

from megatron_qsparse.inference import cpu_kernels
from megatron_qsparse.inference.model import InferenceModel


@dataclass
class Generation:
    """Generated ids and timings. ``decode_tokens`` counts the single-token forward passes."""

    tokens: list[int] = field(default_factory=list)
    prompt_tokens: int = 0
    prefill_seconds: float = 0.0
    decode_seconds: float = 0.0
    decode_tokens: int = 0
    stopped_at_eod: bool = False
    profile: dict[str, float] | None = None  # ms per decode step by phase (profile=True)

    @property
    def decode_tokens_per_second(self) -> float:
        return self.decode_tokens / self.decode_seconds if self.decode_seconds > 0 else 0.0


def sample_next(logits: torch.Tensor, *, greedy: bool, temperature: float, top_p: float,
                generator: torch.Generator | None) -> int:
    """Next id from the fp32 logits ``[V]`` of one position.

    Greedy (or ``temperature == 0``): argmax (the lowest id on ties). Otherwise softmax of
    ``logits / temperature``, restricted to the smallest set of most likely ids whose probability
    reaches ``top_p`` (nucleus sampling; ``top_p = 1`` keeps all), renormalized, then one draw.
    """
    if greedy or temperature == 0.0:
        return int(torch.argmax(logits))
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    if top_p < 1.0:
        p, idx = probs.sort(descending=True)
        keep = (p.cumsum(0) - p) < top_p  # ids before the mass reaches top_p, at least the first
        probs = torch.zeros_like(probs).scatter_(0, idx[keep], p[keep])
    return int(torch.multinomial(probs, 1, generator=generator))


def check_sampling(temperature: float, top_p: float) -> None:
    if temperature < 0:
        raise ValueError(f"--temperature: {temperature} is negative; use 0 (greedy) or more")
    if not 0.0 < top_p <= 1.0:
        raise ValueError(f"--top-p: {top_p} is outside (0, 1]; use e.g. 0.9")


@torch.inference_mode()
def generate(model: InferenceModel, prompt: list[int], max_new_tokens: int, *,
             greedy: bool = True, temperature: float = 1.0, top_p: float = 1.0,
             seed: int | None = None, vocab_size: int | None = None,
             stop_ids: tuple[int, ...] = (),
             stop_when: Callable[[list[int]], bool] | None = None,
             profile: bool = False) -> Generation:
    """Generate up to ``max_new_tokens`` ids after ``prompt`` (batch size 1).

    ``vocab_size`` limits sampling to the tokenizer's ids (the model's vocabulary is padded);
    generation stops after an id in ``stop_ids``, or when ``stop_when(tokens so far)`` is true
    after a new id (e.g. a stop string in the decoded text). ``profile``: time the phases of
    the compiled decode step (:func:`cpu_kernels.decode_profile`) into ``Generation.profile``
    (left None on the layer-by-layer path).
    """
    check_sampling(temperature, top_p)
    if not prompt:
        raise ValueError("generate: the prompt has no tokens")
    if max_new_tokens < 1:
        raise ValueError(f"--max-new-tokens: {max_new_tokens}; use 1 or more")
    cache = model.new_cache(1, len(prompt) + max_new_tokens)
    gen = torch.Generator().manual_seed(seed) if seed is not None else None
    out = Generation(prompt_tokens=len(prompt))
    device = model.model.embedding.weight.device
    t0 = time.perf_counter()
    logits = model(torch.tensor([prompt], device=device), cache, last_only=True)[0, -1]
    out.prefill_seconds = time.perf_counter() - t0
    profile = profile and model.step is not None
    if profile:
        cpu_kernels.set_decode_profile(True)
    t0 = time.perf_counter()
    for step in range(max_new_tokens):
        nxt = sample_next(logits[:vocab_size] if vocab_size else logits, greedy=greedy,
                          temperature=temperature, top_p=top_p, generator=gen)
        out.tokens.append(nxt)
        if nxt in stop_ids:
            out.stopped_at_eod = True
            break
        if step == max_new_tokens - 1 or (stop_when is not None and stop_when(out.tokens)):
            break
        logits = model.decode_token(nxt, cache)
        out.decode_tokens += 1
    out.decode_seconds = time.perf_counter() - t0
    if profile:
        out.profile = cpu_kernels.decode_profile()
        cpu_kernels.set_decode_profile(False)
    return out
