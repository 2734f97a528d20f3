"""Generation with a KV cache equals the full forward; sampling; errors.

Cached logits vs a full forward over the whole sequence: ``atol 1e-4`` (fp32; the decode steps
run the sparse GEMV and attention over the cache, i.e. other summation orders), and the greedy
tokens must be identical.
"""

from __future__ import annotations

import pytest
import torch

from megatron_qsparse.config import ModelConfig, QSparseConfig
from megatron_qsparse.inference import InferenceModel, cpu_kernels, generate, sample_next
from megatron_qsparse.model.gpt import GPTModel

# the compiled decode step and the kernel paths exist only with the C++ extension
# (MEGATRON_QSPARSE_KERNELS=0 or no compiler: the reference path, tested on its own)
needs_kernels = pytest.mark.skipif(not cpu_kernels.available(),
                                   reason="needs the compiled decode kernels")

VOCAB = 256
CONFIGS = {
    "dense": QSparseConfig(mode="none"),
    "topk": QSparseConfig(ratio=0.6),
    "per-kind-int8": QSparseConfig(ratio=0.5, down_ratio=0.7, quantize_activations=True),
    "block": QSparseConfig(mode="block", block="2:4"),
    "bitnet-topk": QSparseConfig(ratio=0.5, bitnet=True),
}


def build(qcfg: QSparseConfig, groups: int = 2, ffn: str = "relu2_glu", **kw) -> GPTModel:
    torch.manual_seed(0)
    cfg = ModelConfig(num_layers=2, hidden_size=64, num_attention_heads=4,
                      num_query_groups=groups, seq_length=48, ffn_type=ffn, **kw)
    return GPTModel(cfg.with_sparsity(qcfg), VOCAB).eval()


def cached_logits(im: InferenceModel, tokens: torch.Tensor, prefill: int, chunk: int = 1):
    cache = im.new_cache(tokens.shape[0], tokens.shape[1])
    with torch.inference_mode():
        outs = [im(tokens[:, :prefill], cache)]
        for t in range(prefill, tokens.shape[1], chunk):
            outs.append(im(tokens[:, t:t + chunk], cache))
    assert cache.length == tokens.shape[1]
    return torch.cat(outs, dim=1)


@pytest.mark.parametrize("name", sorted(CONFIGS))
@pytest.mark.parametrize("groups", [1, 2, 4])  # GQA 4/1, 4/2 and plain multi-head
def test_kv_cache_equals_full_forward(name, groups):
    model = build(CONFIGS[name], groups)
    tokens = torch.randint(0, VOCAB, (1, 40), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        full = model(tokens)
    im = InferenceModel(model)
    if name != "dense" and cpu_kernels.available():
        assert "reference" not in im.decode_paths()
    got = cached_logits(im, tokens, prefill=7)
    assert torch.allclose(got, full, atol=1e-4, rtol=0), float((got - full).abs().max())
    assert torch.equal(got.argmax(-1), full.argmax(-1))


def test_chunked_prefill_after_cache_and_batch():
    """Chunks of several tokens after cached ones (explicit causal mask with an offset), batch 2,
    SwiGLU, untied head."""
    model = build(CONFIGS["topk"], ffn="swiglu", untie_embeddings_and_output_weights=True)
    tokens = torch.randint(0, VOCAB, (2, 30), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        full = model(tokens)
    got = cached_logits(InferenceModel(model), tokens, prefill=6, chunk=4)
    assert torch.allclose(got, full, atol=1e-4, rtol=0)


def test_kernel_off_is_the_training_model():
    model = build(CONFIGS["topk"])
    im = InferenceModel(model, sparse_kernel=False)
    assert im.decode_paths() == {"reference": 8}
    tokens = torch.randint(0, VOCAB, (1, 20), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        full = model(tokens)
    assert torch.allclose(cached_logits(im, tokens, prefill=20), full, atol=1e-6, rtol=0)


@pytest.mark.parametrize("name", ["dense", "topk"])
def test_greedy_generation_equals_recomputing_the_sequence(name):
    model = build(CONFIGS[name])
    prompt = [5, 17, 42, 7]
    out = generate(InferenceModel(model), prompt, 12, greedy=True)
    seq = list(prompt)
    with torch.no_grad():
        for _ in range(12):
            seq.append(int(model(torch.tensor([seq]))[0, -1].argmax()))
    assert out.tokens == seq[len(prompt):]
    assert out.decode_tokens == 11 and out.decode_tokens_per_second > 0


def test_sampling_top_p_temperature_and_seed():
    logits = torch.tensor([4.0, 3.0, 1.0, -2.0, 0.5])
    g = torch.Generator().manual_seed(0)
    draws = {sample_next(logits, greedy=False, temperature=1.0, top_p=0.8, generator=g)
             for _ in range(200)}
    # softmax ≈ [0.69, 0.25, 0.03, 0.00, 0.02]: the 0.8 nucleus is {0, 1}
    assert draws == {0, 1}
    assert sample_next(logits, greedy=True, temperature=1.0, top_p=1.0, generator=None) == 0
    assert sample_next(logits, greedy=False, temperature=0.0, top_p=1.0, generator=None) == 0
    hot = {sample_next(logits, greedy=False, temperature=50.0, top_p=1.0, generator=g)
           for _ in range(300)}
    assert hot == {0, 1, 2, 3, 4}
    im = InferenceModel(build(CONFIGS["topk"]))
    a = generate(im, [1, 2, 3], 10, greedy=False, temperature=0.9, top_p=0.9, seed=7)
    b = generate(im, [1, 2, 3], 10, greedy=False, temperature=0.9, top_p=0.9, seed=7)
    assert a.tokens == b.tokens
    limited = generate(im, [1, 2, 3], 30, greedy=False, temperature=5.0, seed=1, vocab_size=10)
    assert all(t < 10 for t in limited.tokens)


def test_stop_and_errors():
    im = InferenceModel(build(CONFIGS["topk"]))
    first = generate(im, [1, 2, 3], 1).tokens[0]
    out = generate(im, [1, 2, 3], 10, stop_ids=(first,))
    assert out.tokens == [first] and out.stopped_at_eod
    with pytest.raises(ValueError, match="exceed the model's 48"):
        generate(im, [1] * 40, 9)
    with pytest.raises(ValueError, match="--top-p"):
        generate(im, [1], 2, greedy=False, top_p=0.0)
    cache = im.new_cache(1, 4)
    with pytest.raises(ValueError, match="KV cache full"):
        im(torch.zeros(1, 5, dtype=torch.long), cache)


def test_bf16_decode_weights_stay_close():
    """``weight_dtype=bfloat16`` halves the decode traffic; logits move by bf16 weight rounding."""
    model = build(CONFIGS["topk"])
    tokens = torch.randint(0, VOCAB, (1, 16), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        full = model(tokens)
    im = InferenceModel(model, weight_dtype=torch.bfloat16)
    assert all(m.wt.dtype == torch.bfloat16 for m in im.modules() if hasattr(m, "wt"))
    got = cached_logits(im, tokens, prefill=4)
    assert got.dtype == torch.float32
    assert torch.allclose(got, full, atol=5e-2, rtol=0)


@pytest.mark.parametrize("wdtype, atol", [(torch.float16, 0.1), (torch.int8, 0.2)], ids=str)
def test_fp16_int8_decode_weights(wdtype, atol):
    """16-bit and int8 decode weights (the LM head too): the logits equal the model with the
    dequantized weights (fp32 summation order: 1e-4) and stay near the fp32 model (``atol``: a
    rounded weight can move an activation across the Top-K threshold, which swaps whole rows)."""
    from megatron_qsparse.inference import cpu_kernels

    model = build(CONFIGS["topk"], ffn="swiglu", untie_embeddings_and_output_weights=True)
    tokens = torch.randint(0, VOCAB, (1, 16), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        full = model(tokens)
    for compiled in (True, False):
        im = InferenceModel(build(CONFIGS["topk"], ffn="swiglu",
                                  untie_embeddings_and_output_weights=True),
                            weight_dtype=wdtype, compiled_step=compiled)
        # without the compiled kernels (MEGATRON_QSPARSE_KERNELS=0) the reference runs them
        assert (im.step is not None) == (compiled and cpu_kernels.available()), im.step_unavailable
        assert im.head_wt.dtype == wdtype and (im.head_scale is not None) == (wdtype == torch.int8)
        assert all(m.wt.dtype == wdtype for m in im.modules() if hasattr(m, "wt"))
        got = cached_logits(im, tokens, prefill=4)
        assert torch.allclose(got, full, atol=atol, rtol=0), float((got - full).abs().max())
        # the model whose weights are the dequantized ones (what tools/evaluate.py scores)
        from megatron_qsparse.inference.linear import round_trip_decode_weights
        deq = build(CONFIGS["topk"], ffn="swiglu", untie_embeddings_and_output_weights=True)
        assert round_trip_decode_weights(deq, wdtype) == 2 * 4 + 1
        with torch.no_grad():
            for layer, ref in zip(im.model.layers, deq.layers):
                assert torch.equal(layer.mlp.down.weight_t().t(), ref.mlp.down.weight)
            assert torch.equal(cpu_kernels.dequantize(im.head_wt, im.head_scale).t(),
                               deq.output_weight())
            exact = deq(tokens)
        assert torch.allclose(got, exact, atol=1e-4, rtol=0), float((got - exact).abs().max())
        assert torch.equal(got[0, 4:].argmax(-1), exact[0, 4:].argmax(-1))


# ---------------------------------------------------------------------------------------------
# the compiled decode step (one C++ call per token) against the layer-by-layer path

STEP_VARIANTS = {
    "dense": (QSparseConfig(mode="none"), {}),
    "topk-gqa": (QSparseConfig(ratio=0.6), {}),
    "topk-mha": (QSparseConfig(ratio=0.6), {"groups": 4}),
    "per-kind-swiglu-untied": (QSparseConfig(ratio=0.5, qkv_ratio=0.3, down_ratio=0.8),
                               {"ffn": "swiglu", "untie_embeddings_and_output_weights": True}),
    "layernorm-biases": (QSparseConfig(ratio=0.4),
                         {"normalization": "LayerNorm", "add_bias_linear": True}),
    "qkv-bias-mqa": (QSparseConfig(ratio=0.7), {"groups": 1, "add_qkv_bias": True}),
    # attention width 4 x 64 = 256 > hidden 64 and > 2 x ffn: the widest Top-K input is o's
    "wide-heads-narrow-ffn": (QSparseConfig(ratio=0.5), {"kv_channels": 64, "ffn_hidden_size": 64}),
    # the modes the step runs through a written sparse input
    "int8-topk": (QSparseConfig(ratio=0.5, down_ratio=0.7, quantize_activations=True), {}),
    "l2-rescale": (QSparseConfig(ratio=0.6, rescale="l2"), {"ffn": "swiglu"}),
    "block-2:4": (QSparseConfig(mode="block", block="2:4"), {}),
    "block-3:8-layernorm": (QSparseConfig(mode="block", block="3:8"),
                            {"normalization": "LayerNorm"}),
    "relu": (QSparseConfig(mode="relu"), {}),
    "bitnet-dense": (QSparseConfig(mode="none", bitnet=True), {}),
    "bitnet-topk": (QSparseConfig(ratio=0.5, bitnet=True), {"ffn": "swiglu"}),
    "bitnet-block-int8": (QSparseConfig(mode="block", block="2:4", bitnet=True,
                                        quantize_activations=True), {}),
    "dense-int8": (QSparseConfig(mode="none", quantize_activations=True), {}),
    # mixture of experts: DeepSpeed's routing of one token in evaluation, experts' Top-K inside
    "moe-top2": (QSparseConfig(ratio=0.5), {"num_experts": 4}),
    "moe-top1-every-other-sparse-router": (
        QSparseConfig(ratio=0.6), {"num_experts": 3, "moe_router_topk": 1, "moe_layer_freq": 2,
                                   "moe_router_sparsify_input": True, "ffn": "swiglu"}),
    "moe-bitnet-block": (QSparseConfig(mode="block", block="2:4", bitnet=True),
                         {"num_experts": 2, "add_bias_linear": True}),
}


def _projections(im: InferenceModel) -> int:
    from megatron_qsparse.inference.linear import DecodeLinear
    return sum(isinstance(m, DecodeLinear) for m in im.modules())


def _twin(qcfg, kw, **im_kw):
    """The same model twice: compiled step on and off."""
    kw = dict(kw)
    groups = kw.pop("groups", 2)
    a, b = build(qcfg, groups, **kw), build(qcfg, groups, **kw)
    if kw.get("add_bias_linear") or kw.get("add_qkv_bias") or kw.get("normalization"):
        with torch.no_grad():  # biases and norm shifts start at 0; make them matter
            g = torch.Generator().manual_seed(5)
            for (n, p), q in zip(a.named_parameters(), b.parameters()):
                if n.endswith("bias"):
                    p.normal_(0, 0.1, generator=g)
                    q.copy_(p)
    return (InferenceModel(a, compiled_step=True, **im_kw),
            InferenceModel(b, compiled_step=False, **im_kw))


@pytest.mark.parametrize("name", sorted(STEP_VARIANTS))
@needs_kernels
def test_compiled_step_equals_layer_by_layer(name, isa):
    """Prefill by the layers, then 24 decode steps: logits and KV cache equal the layer-by-layer
    path (fp32 summation order: atol 1e-4), same greedy tokens."""
    qcfg, kw = STEP_VARIANTS[name]
    fast, slow = _twin(qcfg, kw)
    assert fast.step is not None, fast.step_unavailable
    experts = kw.get("num_experts") or 1
    moe_blocks = len(range(0, 2, kw.get("moe_layer_freq", 1))) if "num_experts" in kw else 0
    assert _projections(fast) == 8 + moe_blocks * 2 * (experts - 1)
    assert fast.decode_paths() == {"compiled-step": _projections(fast)}
    assert "compiled-step" not in slow.decode_paths()
    prompt = torch.randint(0, VOCAB, (1, 9), generator=torch.Generator().manual_seed(6))
    cf, cs = fast.new_cache(1, 40), slow.new_cache(1, 40)
    with torch.inference_mode():
        lf = fast(prompt, cf, last_only=True)[0, -1]
        ls = slow(prompt, cs, last_only=True)[0, -1]
        for _ in range(24):
            tok = int(ls.argmax())
            assert int(lf.argmax()) == tok
            lf, ls = fast.decode_token(tok, cf), slow.decode_token(tok, cs)
            assert lf.shape == ls.shape == (VOCAB,)
            assert torch.allclose(lf, ls, atol=1e-4, rtol=0), float((lf - ls).abs().max())
    assert cf.length == cs.length == 33
    assert torch.allclose(cf.k, cs.k, atol=1e-5) and torch.allclose(cf.v, cs.v, atol=1e-5)


@needs_kernels
@pytest.mark.parametrize("ffn", ["swiglu", "relu2_glu"])
def test_dense_projections_and_the_head_are_tiled(ffn, isa):
    """Projections without a selection and the LM head hold tiled 16-bit weights, except the down
    projection after a ReLU² GLU (half its inputs are exact zeros, skipped row by row); Top-K
    projections keep the row layout. The step's logits equal a row-layout twin's."""
    kw = {"ffn": ffn, "untie_embeddings_and_output_weights": True, "ffn_hidden_size": 128}
    dense = InferenceModel(build(CONFIGS["dense"], **kw), weight_dtype=torch.bfloat16)
    tiled = {n.rsplit(".", 1)[-1]: m.wt.dim() == 3 for n, m in dense.model.named_modules()
             if hasattr(m, "wt")}
    assert tiled == {"qkv": True, "o": True, "gate_up": True, "down": ffn == "swiglu"}
    assert dense.head_wt.dim() == 3
    sparse = InferenceModel(build(CONFIGS["topk"], **kw), weight_dtype=torch.bfloat16)
    assert all(m.wt.dim() == 2 for m in sparse.modules() if hasattr(m, "wt"))
    assert sparse.head_wt.dim() == 3
    real = cpu_kernels.tile_if_dense
    try:
        cpu_kernels.tile_if_dense = lambda w: w
        rows = InferenceModel(build(CONFIGS["dense"], **kw), weight_dtype=torch.bfloat16)
    finally:
        cpu_kernels.tile_if_dense = real
    assert rows.head_wt.dim() == 2 and dense.step is not None and rows.step is not None
    tokens = torch.randint(0, VOCAB, (1, 12), generator=torch.Generator().manual_seed(7))
    assert torch.allclose(cached_logits(dense, tokens, prefill=4), cached_logits(rows, tokens, 4),
                          atol=1e-5, rtol=0)
    fp32 = InferenceModel(build(CONFIGS["dense"], **kw))  # fp32 weights stay in rows
    assert all(m.wt.dim() == 2 for m in fp32.modules() if hasattr(m, "wt"))


@needs_kernels
def test_compiled_step_bf16_weights_and_generation():
    """bf16 decode weights go through the step too; generate() gives the layer path's tokens."""
    fast, slow = _twin(QSparseConfig(ratio=0.6), {}, weight_dtype=torch.bfloat16)
    assert fast.step is not None
    a = generate(fast, [3, 1, 4, 1, 5], 20)
    b = generate(slow, [3, 1, 4, 1, 5], 20)
    assert a.tokens == b.tokens and a.decode_tokens == 19


@needs_kernels
def test_compiled_step_moe_int8_weights_and_generation():
    """An MoE model with int8 decode weights (experts included) through the step: the layer
    path's greedy tokens, and its logits up to summation order."""
    kw = {"num_experts": 4, "ffn": "swiglu"}
    fast, slow = _twin(QSparseConfig(ratio=0.5), kw, weight_dtype=torch.int8)
    assert fast.step is not None, fast.step_unavailable
    assert all(m.wt.dtype == torch.int8 for m in fast.modules() if hasattr(m, "wt"))
    assert _projections(fast) == 2 * (2 + 2 * 4)
    a = generate(fast, [3, 1, 4, 1, 5], 20)
    b = generate(slow, [3, 1, 4, 1, 5], 20)
    assert a.tokens == b.tokens and a.decode_tokens == 19


@needs_kernels
def test_compiled_step_long_context_attention_on_two_threads():
    """A context long enough that the step shares attention out by head over the threads
    (2·heads·positions·head_dim >= 64K multiply-adds): logits equal the layer path's at every
    step, SwiGLU (the step's own exp) included, on 1 and 2 threads alike."""
    torch.manual_seed(0)
    cfg = ModelConfig(num_layers=2, hidden_size=256, num_attention_heads=8, num_query_groups=2,
                      seq_length=160, ffn_type="swiglu")
    a = GPTModel(cfg.with_sparsity(QSparseConfig(ratio=0.6)), VOCAB).eval()
    b = GPTModel(cfg.with_sparsity(QSparseConfig(ratio=0.6)), VOCAB).eval()
    b.load_state_dict(a.state_dict())
    fast, slow = InferenceModel(a, compiled_step=True), InferenceModel(b, compiled_step=False)
    assert fast.step is not None, fast.step_unavailable
    prompt = torch.randint(0, VOCAB, (1, 120), generator=torch.Generator().manual_seed(2))
    prev = torch.get_num_threads()
    try:
        for threads in (2, 1):
            torch.set_num_threads(threads)
            cf, cs = fast.new_cache(1, 160), slow.new_cache(1, 160)
            with torch.inference_mode():
                lf = fast(prompt, cf, last_only=True)[0, -1]
                ls = slow(prompt, cs, last_only=True)[0, -1]
                for _ in range(30):  # positions 120..149: 2·8·len·32 >= 61K..76K
                    tok = int(ls.argmax())
                    lf, ls = fast.decode_token(tok, cf), slow.decode_token(tok, cs)
                    assert torch.allclose(lf, ls, atol=1e-4, rtol=0), float((lf - ls).abs().max())
    finally:
        torch.set_num_threads(prev)


@needs_kernels
def test_generate_profile_splits_the_step():
    """generate(profile=True): ms per step by phase on the compiled step, each phase within the
    step, the phases adding up to it; None on the layer path; the timers are off afterwards."""
    fast, slow = _twin(QSparseConfig(ratio=0.6), {"ffn": "swiglu"})
    out = generate(fast, [3, 1, 4, 1, 5], 12, profile=True)
    prof = out.profile
    phases = ("select", "products", "head", "attention", "activation", "other")
    assert set(phases) | {"reduce", "wait", "step"} | set(cpu_kernels.PROJECTIONS) <= set(prof)
    assert prof["products"] == pytest.approx(sum(prof[k] for k in cpu_kernels.PROJECTIONS))
    assert min(prof[k] for k in ("qkv", "o", "gate_up", "down")) > 0 and prof["router"] == 0
    assert prof["step"] > 0 and all(prof[k] >= 0 for k in phases if k != "other")
    # the timed phases are disjoint parts of the step: together they fit in it ("other", the
    # step minus them, is not negative beyond the clock's resolution)
    assert prof["other"] >= -1e-6 * max(1.0, prof["step"])
    assert prof["products"] > 0 and prof["select"] > 0 and prof["activation"] > 0
    assert prof["products"] + prof["head"] <= prof["step"]
    assert generate(slow, [3, 1, 4, 1, 5], 4, profile=True).profile is None
    generate(fast, [3, 1, 4], 4)
    assert cpu_kernels.decode_profile() == {}  # switched off and reset by the profiled call


@pytest.mark.parametrize("convert, reason", [
    (lambda m: m.double(), "float64"),
])
@needs_kernels
def test_compiled_step_falls_back_to_layers(convert, reason):
    im = InferenceModel(convert(build(QSparseConfig(ratio=0.5))))
    assert im.step is None and reason in im.step_unavailable
    assert "compiled-step" not in im.decode_paths()
    out = generate(im, [1, 2, 3], 4)  # still decodes, layer by layer
    assert len(out.tokens) == 4


@needs_kernels
def test_compiled_step_errors():
    im = InferenceModel(build(QSparseConfig(ratio=0.6)))
    cache = im.new_cache(1, 4)
    with torch.inference_mode():
        im(torch.tensor([[1, 2, 3]]), cache)
        with pytest.raises(RuntimeError, match="outside"):
            im.step.step(VOCAB, 3, cache.k, cache.v)
        im.decode_token(7, cache)
        with pytest.raises(ValueError, match="KV cache full"):
            im.decode_token(7, cache)
        with pytest.raises(RuntimeError, match="cache"):
            im.step.step(1, 0, cache.k[:, :, :1], cache.v)
    from megatron_qsparse.sparsity.kernels import use_kernels
    with use_kernels(False):
        off = InferenceModel(build(QSparseConfig(ratio=0.6)))
    assert off.step is None and "switched off" in off.step_unavailable
