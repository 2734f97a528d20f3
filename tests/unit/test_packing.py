"""Packed sequences: first-fit packing of SFT samples, Megatron's document-reset arrays, the
block-diagonal causal mask, RoPE by position ids, and the model on a packed batch equal to the
samples (documents) run one by one.

Tolerances of the one-by-one comparisons: fp64 ``rtol=1e-10`` (losses and every gradient), fp32
``rtol=1e-5, atol=1e-6`` (losses) and ``rtol=1e-4, atol=1e-6`` (gradients: summed over a batch in
another order). Masked keys get exactly zero attention weight, and every sparsifier works per
token, so the only differences are the order of floating-point sums.
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from megatron_qsparse.config import Config, ConfigError, ModelConfig, QSparseConfig, validate
from megatron_qsparse.data.documents import DocumentResetDataset, eod_document_fields
from megatron_qsparse.data.indexed_dataset import IndexedDataset, IndexedDatasetBuilder
from megatron_qsparse.data.sampler import collate_tokens
from megatron_qsparse.data.sft_dataset import MASK_SUFFIX, build_sft_datasets, epoch_order
from megatron_qsparse.data.sft_packing import PackedSFTDataset, first_fit
from megatron_qsparse.model import GPTModel
from megatron_qsparse.model.masking import document_causal_mask, flex_document_attention
from megatron_qsparse.model.transformer import RotaryEmbedding
from megatron_qsparse.parallel.state import ParallelState
from megatron_qsparse.training.loop import document_inputs, get_batch
from megatron_qsparse.training.setup import _with_document_resets

V, PAD, EOD, BOS = 64, 63, 62, 61
SEQ = 32


def _naive_first_fit(lengths, capacity):
    free, out = [], []
    for n in np.minimum(lengths, capacity):
        w = next((i for i, f in enumerate(free) if f >= n), None)
        if w is None:
            free.append(capacity)
            w = len(free) - 1
        free[w] -= n
        out.append(w)
    return np.array(out)


@pytest.mark.parametrize("n,capacity", [(1, 8), (7, 8), (300, 33), (1000, 129)])
def test_first_fit_is_first_fit(n, capacity):
    rng = np.random.default_rng(n)
    lengths = np.clip(rng.lognormal(np.log(capacity / 4), 0.8, n).astype(int), 1, 2 * capacity)
    got = first_fit(lengths, capacity)
    np.testing.assert_array_equal(got, _naive_first_fit(lengths, capacity))
    sums = np.bincount(got, weights=np.minimum(lengths, capacity))
    assert sums.max() <= capacity and (sums > 0).all()  # windows numbered without gaps


def _write_sft(prefix: str, n: int, seed: int = 0) -> list[tuple[np.ndarray, np.ndarray]]:
    """``n`` samples ``[bos] prompt | response eod`` of lognormal lengths (some longer than a
    window), written as PREFIX and PREFIX_mask."""
    rng = np.random.default_rng(seed)
    samples = []
    for i in range(n):
        p, r = int(rng.integers(2, 12)), int(np.clip(rng.lognormal(2.0, 0.7), 1, 40))
        r = 40 if i % 20 == 7 else r  # a few longer than a window
        tokens = np.concatenate([[BOS], rng.integers(0, 60, p + r), [EOD]])
        mask = np.array([0] * (1 + p) + [1] * (r + 1))
        samples.append((tokens, mask))
    with IndexedDatasetBuilder(prefix, np.uint16) as b, \
            IndexedDatasetBuilder(prefix + MASK_SUFFIX, np.uint8) as m:
        for t, k in samples:
            b.add_document(t)
            m.add_document(k)
    return samples


@pytest.fixture(scope="module")
def sft(tmp_path_factory):
    prefix = str(tmp_path_factory.mktemp("packed") / "toy_sft")
    return prefix, _write_sft(prefix, 60)


def _packed(prefix, extra=3, cache_dir=None):
    toks, mask = IndexedDataset(prefix), IndexedDataset(prefix + MASK_SUFFIX)
    first = PackedSFTDataset(toks, mask, np.arange(len(toks)), 1, SEQ, 5, PAD,
                             cache_dir=cache_dir)
    return PackedSFTDataset(toks, mask, np.arange(len(toks)), first.sequences_per_epoch + extra,
                            SEQ, 5, PAD, cache_dir=cache_dir)


def test_packing_holds_every_sample_once_with_its_boundaries(sft, tmp_path):
    prefix, samples = sft
    ds = _packed(prefix, cache_dir=str(tmp_path))
    n = SEQ + 1
    per_epoch = ds.sequences_per_epoch
    assert per_epoch < 0.6 * len(samples) and 0.75 < ds.fill <= 1  # packing pays here
    assert ds.truncated == sum(len(t) > n for t, _ in samples) > 0
    first_epoch = np.concatenate([ds.sample_documents(i) for i in range(per_epoch)])
    np.testing.assert_array_equal(first_epoch[np.argsort(first_epoch)], np.arange(len(samples)))
    # the windows hold the samples in the epoch's shuffled order, placed first-fit
    # (and the next epoch starts over in a new order)
    lengths = np.minimum([len(t) for t, _ in samples], n)
    for w in range(len(ds)):
        epoch, j = divmod(w, per_epoch)
        order = epoch_order(5, epoch, len(samples))
        windows = first_fit(lengths[order], n)
        np.testing.assert_array_equal(ds.sample_documents(w), order[windows == j])
    for w in range(len(ds)):
        item, at = ds[w], 0
        assert all(v.shape == (n,) and v.dtype == np.int64 for v in item.values())
        for s, doc in enumerate(ds.sample_documents(w)):
            t, m = samples[doc]
            t, m = t[:n - at], m[:n - at]
            sl = slice(at, at + len(t))
            np.testing.assert_array_equal(item["tokens"][sl], t)
            np.testing.assert_array_equal(item["loss_mask"][sl], np.concatenate([[0], m[1:]]))
            assert (item["segment_ids"][sl] == s).all()
            np.testing.assert_array_equal(item["position_ids"][sl], np.arange(len(t)))
            at += len(t)
        assert (item["tokens"][at:] == PAD).all() and not item["loss_mask"][at:].any()
        assert (item["segment_ids"][at:] == len(ds.sample_documents(w))).all()
    again = _packed(prefix, cache_dir=str(tmp_path))
    assert again.loaded_from_cache and not ds.loaded_from_cache
    assert again.sequences_per_epoch == per_epoch
    np.testing.assert_array_equal(again.pack_docs, ds.pack_docs)
    np.testing.assert_array_equal(again.pack_offsets, ds.pack_offsets)


def test_builder_packs_and_batches_carry_the_fields(sft, tmp_path):
    prefix, _ = sft
    train, valid, _ = build_sft_datasets([prefix], "80,20,0", SEQ, 0, (10, 4, 0), PAD,
                                         cache_dir=str(tmp_path), packing=True)
    assert isinstance(train, PackedSFTDataset) and len(train) == 10 and len(valid) == 4
    assert set(train.pack_docs.tolist()) <= set(range(48))  # the train split's samples
    assert set(valid.pack_docs.tolist()) <= set(range(48, 60))
    batch = collate_tokens([train[i] for i in range(3)])
    tokens, labels = get_batch(batch)
    extras = document_inputs(batch)
    assert list(extras) == ["position_ids", "segment_ids"]
    assert all(v.shape == tokens.shape for v in extras.values())
    assert torch.equal(extras["segment_ids"], batch["segment_ids"][:, :-1])
    # a target never belongs to another sample than its input
    crossing = batch["segment_ids"][:, 1:] != batch["segment_ids"][:, :-1]
    assert (labels[crossing] == -100).all()


def _megatron_ltor(data, eod, reset_position_ids, reset_attention_mask, eod_mask_loss):
    """Megatron-LM's get_ltor_masks_and_position_ids (one sequence; True = masked out)."""
    s = data.numel()
    attention_mask = torch.tril(torch.ones((s, s))).unsqueeze(0)
    loss_mask = torch.ones(s)
    if eod_mask_loss:
        loss_mask[data == eod] = 0.0
    position_ids = torch.arange(s, dtype=torch.long)
    if reset_position_ids or reset_attention_mask:
        eod_index = position_ids[data == eod].clone()
        prev_index = 0
        for j in range(eod_index.numel()):
            i = eod_index[j]
            if reset_attention_mask:
                attention_mask[0, (i + 1):, :(i + 1)] = 0
            if reset_position_ids:
                position_ids[(i + 1):] -= i + 1 - prev_index
                prev_index = i + 1
    return attention_mask < 0.5, loss_mask, position_ids


@pytest.mark.parametrize("flags", [(True, True, True), (True, False, False),
                                   (False, True, False), (False, False, True)])
def test_document_fields_are_megatrons(flags):
    g = torch.Generator().manual_seed(sum(flags))
    for trial in range(20):
        tokens = torch.randint(0, 8, (SEQ + 1,), generator=g)
        tokens[tokens == 7] = EOD  # ~1 in 8 an eod, sometimes first, last or twice in a row
        if trial == 0:
            tokens[0] = tokens[1] = EOD
        fields = eod_document_fields(tokens.numpy(), EOD, *flags)
        masked, loss_mask, positions = _megatron_ltor(tokens[:-1], EOD, *flags)
        assert set(fields) == {k for k, on in zip(("position_ids", "segment_ids", "loss_mask"),
                                                  flags) if on}
        if flags[0]:
            np.testing.assert_array_equal(fields["position_ids"][:-1], positions.numpy())
        if flags[1]:
            mask = document_causal_mask(torch.from_numpy(fields["segment_ids"][None, :-1]))
            assert torch.equal(mask[0], ~masked)
        if flags[2]:
            np.testing.assert_array_equal(fields["loss_mask"][1:], loss_mask.numpy())


def test_document_mask_and_rope_positions():
    seg = torch.tensor([[0, 0, 0, 1, 1, 2]])
    want = torch.tensor([[1, 0, 0, 0, 0, 0], [1, 1, 0, 0, 0, 0], [1, 1, 1, 0, 0, 0],
                         [0, 0, 0, 1, 0, 0], [0, 0, 0, 1, 1, 0], [0, 0, 0, 0, 0, 1]]).bool()
    assert torch.equal(document_causal_mask(seg)[0, 0], want)
    assert torch.equal(document_causal_mask(torch.zeros(2, 5, dtype=torch.long))[:, 0],
                       torch.ones(2, 5, 5, dtype=torch.bool).tril())
    rope = RotaryEmbedding(8, 16)
    cos, sin = rope(6, torch.device("cpu"))
    pos = torch.tensor([[0, 1, 2, 0, 1, 0], [0, 1, 2, 3, 4, 5]])
    pcos, psin = rope(6, torch.device("cpu"), position_ids=pos)
    assert pcos.shape == (2, 1, 6, 8)
    assert torch.equal(pcos[1, 0], cos) and torch.equal(psin[1, 0], sin)
    assert torch.equal(pcos[0, 0, 3:5], cos[:2]) and torch.equal(psin[0, 0, 5], sin[0])


def test_flex_attention_rule_equals_the_sdpa_mask():
    """The CUDA path's FlexAttention block mask (run unfused here) equals the boolean mask."""
    g = torch.Generator().manual_seed(0)
    q = torch.randn(2, 4, 48, 16, generator=g)
    k, v = (torch.randn(2, 2, 48, 16, generator=g) for _ in range(2))
    seg = torch.sort(torch.randint(0, 4, (2, 48), generator=g), dim=-1).values
    want = F.scaled_dot_product_attention(q, k, v, attn_mask=document_causal_mask(seg),
                                          enable_gqa=True)
    with warnings.catch_warnings():  # "flex_attention called without torch.compile()"
        warnings.simplefilter("ignore", UserWarning)
        got = flex_document_attention(q, k, v, seg, enable_gqa=True, compiled=False)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def _model(dtype, **q):
    cfg = ModelConfig(num_layers=2, hidden_size=32, num_attention_heads=4, num_query_groups=2,
                      seq_length=SEQ, ffn_hidden_size=64).with_sparsity(
        QSparseConfig(**(q or {"ratio": 0.5})))
    torch.manual_seed(0)
    return GPTModel(cfg, V, parallel=ParallelState.single()).to(dtype)


TOL = {torch.float64: (dict(rtol=1e-10, atol=1e-12),) * 2,
       torch.float32: (dict(rtol=1e-5, atol=1e-6), dict(rtol=1e-4, atol=1e-6))}


def _loss_and_grads(model, tokens, labels, **extras):
    model.zero_grad()
    per_token = model(tokens, labels, **extras)
    per_token.sum().backward()
    return per_token.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


def _compare_grads(got, want, tol):
    for name in want:
        torch.testing.assert_close(got[name], want[name], **tol, msg=lambda m, n=name: f"{n}: {m}")


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("variant", [{"ratio": 0.5}, {"mode": "block", "block": "2:4"}])
def test_packed_batch_equals_samples_one_by_one(sft, dtype, variant):
    prefix, samples = sft
    ds = _packed(prefix, extra=0)
    batch = collate_tokens([ds[i] for i in range(4)])
    tokens, labels = get_batch(batch)
    extras = document_inputs(batch)
    model = _model(dtype, **variant)
    loss_tol, grad_tol = TOL[dtype]
    packed, grads = _loss_and_grads(model, tokens, labels, **extras)

    model.zero_grad()
    n = SEQ + 1
    for row in range(4):
        at = 0
        for doc in ds.sample_documents(row):
            t, m = (torch.from_numpy(a[:n - at].astype(np.int64)) for a in samples[doc])
            alone_labels = t[1:].masked_fill(m[1:] == 0, -100)[None]
            alone = model(t[None, :-1], alone_labels)
            alone.sum().backward()  # gradients accumulate over the samples
            torch.testing.assert_close(packed[row, at:at + len(t) - 1], alone[0].detach(),
                                       **loss_tol)
            at += len(t)
        assert not packed[row, at - 1:].any()  # the boundary and the padding are not trained
    _compare_grads(grads, {n: p.grad for n, p in model.named_parameters()}, grad_tol)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_two_documents_with_reset_flags_give_their_own_losses(dtype):
    """A pretraining sequence holding the end of one document and the start of the next, with
    --reset-position-ids --reset-attention-mask --eod-mask-loss: the losses (and gradients) of
    the two documents run separately; the target after the eod is not trained."""
    g = torch.Generator().manual_seed(3)
    doc1 = torch.cat([torch.randint(0, 60, (13,), generator=g), torch.tensor([EOD])])
    doc2 = torch.randint(0, 60, (SEQ + 1 - len(doc1),), generator=g)
    ds = DocumentResetDataset([{"tokens": torch.cat([doc1, doc2]).numpy()}], EOD, True, True,
                              True)
    batch = collate_tokens([ds[0]])
    tokens, labels = get_batch(batch)
    model = _model(dtype)
    loss_tol, grad_tol = TOL[dtype]
    packed, grads = _loss_and_grads(model, tokens, labels, **document_inputs(batch))
    model.zero_grad()
    a = model(doc1[None, :-1], doc1[None, 1:])
    b = model(doc2[None, :-1], doc2[None, 1:])
    (a.sum() + b.sum()).backward()
    torch.testing.assert_close(packed[0, :13], a[0].detach(), **loss_tol)
    assert packed[0, 13] == 0 and labels[0, 13] == -100  # eod -> first token of doc2
    torch.testing.assert_close(packed[0, 14:], b[0].detach(), **loss_tol)
    _compare_grads(grads, {n: p.grad for n, p in model.named_parameters()}, grad_tol)


@pytest.mark.parametrize("granularity", ["selective", "full"])
def test_recomputation_keeps_the_documents(sft, granularity):
    """--recompute-granularity selective/full replays the packed forward (the segment ids reach
    the recomputed attention): the losses and gradients of no recomputation."""
    batch = collate_tokens([_packed(sft[0], extra=0)[i] for i in range(2)])
    tokens, labels = get_batch(batch)
    extras = document_inputs(batch)
    model = _model(torch.float64)
    want = _loss_and_grads(model, tokens, labels, **extras)
    model.config.recompute_granularity = granularity
    again = GPTModel(model.config, V, parallel=ParallelState.single()).to(torch.float64)
    again.load_state_dict(model.state_dict())
    assert again.recompute_blocks == (granularity == "full")
    got = _loss_and_grads(again, tokens, labels, **extras)
    torch.testing.assert_close(got[0], want[0], rtol=1e-12, atol=1e-12)
    _compare_grads(got[1], want[1], dict(rtol=1e-12, atol=1e-12))


def test_default_path_is_unchanged_by_neutral_extras():
    """position ids 0..s-1 and one segment give the outputs of the plain causal path."""
    model = _model(torch.float64)
    tokens = torch.randint(0, V, (2, SEQ), generator=torch.Generator().manual_seed(1))
    plain = model(tokens)
    pos = torch.arange(SEQ).expand(2, SEQ)
    torch.testing.assert_close(model(tokens, position_ids=pos), plain, rtol=0, atol=0)
    torch.testing.assert_close(model(tokens, segment_ids=torch.zeros_like(tokens)), plain,
                               rtol=1e-12, atol=1e-12)


def _data_cfg(**data) -> Config:
    cfg = Config()
    cfg.data.tokenizer_type = "ByteTokenizer"
    cfg.data.data_path = ["x"]
    for k, v in data.items():
        setattr(cfg.data, k, v)
    return cfg


def test_flag_combinations_are_one_line_errors():
    with pytest.raises(ConfigError, match=r"^--sft-packing: .*add --data-format sft"):
        validate(_data_cfg(sft_packing=True))
    for flag in ("reset_position_ids", "reset_attention_mask", "eod_mask_loss"):
        with pytest.raises(ConfigError, match="^--" + flag.replace("_", "-") + ": SFT samples"):
            validate(_data_cfg(data_format="sft", **{flag: True}))
    assert validate(_data_cfg(data_format="sft", sft_packing=True)).data.document_fields() == (
        "position_ids", "segment_ids")
    assert _data_cfg(reset_attention_mask=True, eod_mask_loss=True).data.document_fields() == (
        "segment_ids",)
    assert _data_cfg(data_format="sft").data.document_fields() == ()

    class NoEod:
        eod = -1  # a SentencePiece model without </s>

    cfg = _data_cfg(eod_mask_loss=True)
    with pytest.raises(ConfigError, match="^--eod-mask-loss: the ByteTokenizer tokenizer has no "
                                          "end-of-document token.*; use a tokenizer"):
        _with_document_resets(cfg, NoEod(), [{"tokens": np.zeros(3)}])
    assert _with_document_resets(_data_cfg(), NoEod(), "ds") == "ds"  # no flag: untouched


@pytest.mark.slow
def test_compiled_packed_block_matches_eager(sft):
    """A block compiled with fullgraph=True on packed inputs (position and segment ids) equals
    eager, forward and backward, within the compile tests' fp32 tolerance."""
    import torch._dynamo

    from megatron_qsparse.model.transformer import TransformerBlock

    torch._dynamo.reset()
    cfg = _model(torch.float32).config
    torch.manual_seed(0)
    eager = TransformerBlock(cfg, 0, ParallelState.single())
    compiled = TransformerBlock(cfg, 0, ParallelState.single())
    compiled.load_state_dict(eager.state_dict())
    compiled.compile(fullgraph=True)
    batch = collate_tokens([_packed(sft[0], extra=0)[i] for i in range(2)])
    extras = document_inputs(batch)
    x = torch.randn(2, SEQ, cfg.hidden_size, generator=torch.Generator().manual_seed(2))
    out = []
    for block in (eager, compiled):
        xi = x.clone().requires_grad_()
        y = block(xi, **extras)
        (y * torch.linspace(-1, 1, y.shape[-1])).sum().backward()
        out.append((y.detach(), xi.grad, {n: p.grad for n, p in block.named_parameters()}))
    torch.testing.assert_close(out[1][0], out[0][0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out[1][1], out[0][1], rtol=1e-5, atol=1e-5)
    _compare_grads(out[1][2], out[0][2], dict(rtol=1e-4, atol=1e-5))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_flex_path_equals_the_mask_and_never_synchronises(sft):
    """On CUDA document attention takes FlexAttention: the same values as SDPA with the
    boolean mask (forward and backward), and a compiled packed block step waits on no host."""
    from megatron_qsparse.model import masking
    from megatron_qsparse.model.transformer import TransformerBlock

    g = torch.Generator().manual_seed(0)
    seg = torch.sort(torch.randint(0, 4, (2, 128), generator=g), dim=-1).values.cuda()
    leaves = [torch.randn(2, h, 128, 32, generator=g).cuda().requires_grad_() for h in (4, 2, 2)]
    out = []
    for flex in (False, True):
        masking.FLEX_ON_CUDA = flex
        try:
            y = masking.document_attention(*leaves, seg, enable_gqa=True)
        finally:
            masking.FLEX_ON_CUDA = True
        grads = torch.autograd.grad(y.square().sum(), leaves)
        out.append((y.detach(), grads))
    torch.testing.assert_close(out[1][0], out[0][0], rtol=1e-4, atol=1e-5)
    for a, b in zip(out[1][1], out[0][1]):
        torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-4)

    cfg = _model(torch.float32).config
    block = TransformerBlock(cfg, 0, ParallelState.single()).cuda()
    block.compile(fullgraph=True)
    extras = {k: v.cuda() for k, v in document_inputs(
        collate_tokens([_packed(sft[0], extra=0)[i] for i in range(2)])).items()}
    x = torch.randn(2, SEQ, cfg.hidden_size, device="cuda", requires_grad=True)
    block(x, **extras).sum().backward()  # compile first, outside the check
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        block(x, **extras).sum().backward()
    finally:
        torch.cuda.set_sync_debug_mode(0)
