"""Test bodies that run on every rank of a :class:`~tests.distributed.harness.DistributedPool`.

Each body returns something small (compared by the test) or raises. The reference is always the
single-process model (``ParallelState.single()``) built in the same process from the same seed.
"""

from __future__ import annotations

import contextlib

import torch
import torch.distributed as dist

from megatron_qsparse.config import ModelConfig, QSparseConfig
from megatron_qsparse.model import GPTModel
from megatron_qsparse.model.sharding import shard_state_dict
from megatron_qsparse.parallel import layers as player
from megatron_qsparse.parallel.cross_entropy import vocab_parallel_cross_entropy
from megatron_qsparse.parallel.layers import (ColumnParallelLinear, RowParallelLinear,
                                              VocabParallelEmbedding)
from megatron_qsparse.parallel.mappings import (copy_to_tensor_parallel,
                                                gather_from_tensor_parallel,
                                                reduce_from_tensor_parallel,
                                                scatter_to_tensor_parallel)
from megatron_qsparse.parallel.sharding import gather_model_state_dict, gather_tensor
from megatron_qsparse.parallel.sparsify import global_topk_mask
from megatron_qsparse.parallel.state import ParallelState
from megatron_qsparse.sparsity import Sparsifier, collect_density, reset_density, topk_mask

_states: dict[tuple[int, int], ParallelState] = {}

# fp32 comparisons: relative 1e-5 plus a small absolute floor for values near zero (the TP sums
# are reduced in another order than the single-process matmuls); fp64: 1e-10.
TOL = {torch.float32: dict(rtol=1e-5, atol=1e-6), torch.float64: dict(rtol=1e-10, atol=1e-12)}


def state(tp: int, pp: int = 1) -> ParallelState:
    """The (memoized) groups for TP x PP on this pool; every rank builds them in the same order."""
    if (tp, pp) not in _states:
        _states[(tp, pp)] = ParallelState.build(tp, pp)
    return _states[(tp, pp)]


def world() -> int:
    return dist.get_world_size()


def gather_last(x: torch.Tensor, st: ParallelState) -> torch.Tensor:
    parts = [torch.empty_like(x) for _ in range(st.tp_size)]
    dist.all_gather(parts, x.contiguous(), group=st.tp_group)
    return torch.cat(parts, dim=-1)


# ------------------------------------------------------------------------------ topology / mpu


def check_topology(tp: int, pp: int) -> dict:
    st = state(tp, pp)
    mpu = st.mpu()
    return {
        "tp": (st.tp_rank, st.tp_size, list(st.tp.ranks)),
        "pp": (st.pp_rank, st.pp_size, list(st.pp.ranks)),
        "dp": (st.dp_rank, st.dp_size, list(st.dp.ranks)),
        "mp": (st.mp.rank, st.mp.size, list(st.mp.ranks)),
        "mpu": (mpu.get_tensor_model_parallel_rank(), mpu.get_tensor_model_parallel_world_size(),
                mpu.get_data_parallel_rank(), mpu.get_data_parallel_world_size(),
                mpu.get_model_parallel_rank(), mpu.get_model_parallel_world_size(),
                mpu.get_pipeline_model_parallel_rank(),
                mpu.get_pipeline_model_parallel_world_size(), mpu.get_data_parallel_group_ranks(),
                dist.get_world_size(mpu.get_data_parallel_group()),
                dist.get_world_size(mpu.get_tensor_model_parallel_group()),
                dist.get_world_size(mpu.get_model_parallel_group())),
    }


def check_bad_topology(tp: int) -> str:
    try:
        ParallelState.build(tp)
    except ValueError as e:
        return str(e)
    return ""


# ------------------------------------------------------------------------------ global top-K


def _cases(d: int):
    half = d // 2
    return sorted({1, 2, half - 1, half, half + 1, d - 2, d - 1, d, d + 3, max(1, d // 3),
                   (2 * d) // 3} - {0})


def check_global_topk(seed: int) -> int:
    """``global_topk_mask`` on this rank's slice == ``topk_mask`` of the gathered row, for every K,
    on tie-heavy and ordinary data, fp32 and bf16. Returns the number of cases checked."""
    st = state(world())
    t, r = st.tp_size, st.tp_rank
    g = torch.Generator().manual_seed(seed)
    checked = 0
    for d_l in (1, 3, 8, 13):
        d = d_l * t
        datasets = {
            "normal": torch.randn(5, 7, d, generator=g),
            "ints": torch.randint(-3, 4, (37, d), generator=g).float(),
            "binary": torch.randint(0, 2, (23, d), generator=g).float(),
            "zeros": torch.zeros(4, d),
            "sparse": torch.randn(9, d, generator=g) * (torch.rand(9, d, generator=g) < 0.3),
            "one-hot-rank": torch.zeros(6, d).index_fill_(-1, torch.tensor([d - 1]), 2.0),
        }
        for name, full in datasets.items():
            for dtype in (torch.float32, torch.bfloat16):
                xf = full.to(dtype)
                local = xf.chunk(t, dim=-1)[r]
                for k in _cases(d):
                    want = topk_mask(xf, k).chunk(t, dim=-1)[r]
                    got = global_topk_mask(local, k, st)
                    if not torch.equal(got, want):
                        raise AssertionError(f"mask differs: d={d} k={k} data={name} {dtype}\n"
                                             f"x={local}\ngot={got}\nwant={want}")
                    checked += 1
    return checked


# ------------------------------------------------------------------------------ mappings


def check_mappings() -> bool:
    st = state(world())
    t, r = st.tp_size, st.tp_rank
    g = torch.Generator().manual_seed(0)
    full = torch.randn(3, 4 * t, generator=g, dtype=torch.float64)
    w = torch.randn(3, 4 * t, generator=g, dtype=torch.float64)  # a fixed upstream gradient

    x = full.clone().requires_grad_()
    y = copy_to_tensor_parallel(x, st) * (r + 1)
    y.sum().backward()  # d/dx of sum over ranks of (r+1)·x
    assert torch.equal(y.detach(), full * (r + 1))
    torch.testing.assert_close(x.grad, torch.full_like(full, t * (t + 1) / 2))

    x = full.clone().requires_grad_()
    y = reduce_from_tensor_parallel(x * (r + 1), st)
    torch.testing.assert_close(y, full * t * (t + 1) / 2)
    (y * w).sum().backward()
    torch.testing.assert_close(x.grad, w * (r + 1))

    x = full.clone().requires_grad_()
    y = scatter_to_tensor_parallel(x, st)
    assert torch.equal(y, full.chunk(t, -1)[r])
    (y * w.chunk(t, -1)[r]).sum().backward()
    torch.testing.assert_close(x.grad, w)  # gathered: every rank's chunk of w

    x = full.chunk(t, -1)[r].clone().requires_grad_()
    y = gather_from_tensor_parallel(x, st)
    assert torch.equal(y, full)
    (y * w).sum().backward()
    assert torch.equal(x.grad, w.chunk(t, -1)[r])
    return True


# ------------------------------------------------------------------------------ embedding / CE


def check_embedding_and_cross_entropy() -> bool:
    st = state(world())
    t, r = st.tp_size, st.tp_rank
    V, h = 8 * t, 5
    torch.manual_seed(3)
    ref = VocabParallelEmbedding(V, h, parallel=ParallelState.single()).double()
    torch.manual_seed(3)
    emb = VocabParallelEmbedding(V, h, parallel=st).double()
    assert torch.equal(emb.weight, ref.weight.chunk(t, 0)[r])  # TP-invariant init
    g = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, V, (3, 6), generator=g)
    out, want = emb(tokens), ref(tokens)
    torch.testing.assert_close(out, want, **TOL[torch.float64])
    out.pow(2).sum().backward()
    want.pow(2).sum().backward()
    torch.testing.assert_close(emb.weight.grad, ref.weight.grad.chunk(t, 0)[r])

    logits = torch.randn(3, 6, V, generator=g, dtype=torch.float64) * 4
    labels = torch.randint(0, V, (3, 6), generator=g)
    labels[0, :2] = -100
    full = logits.clone().requires_grad_()
    local = logits.chunk(t, -1)[r].clone().requires_grad_()
    loss_ref = vocab_parallel_cross_entropy(full, labels, ParallelState.single())
    loss = vocab_parallel_cross_entropy(local, labels, st)
    torch.testing.assert_close(loss, loss_ref, **TOL[torch.float64])
    assert torch.all(loss[0, :2] == 0)
    upstream = torch.rand(3, 6, generator=g, dtype=torch.float64)
    (loss_ref * upstream).sum().backward()
    (loss * upstream).sum().backward()
    torch.testing.assert_close(local.grad, full.grad.chunk(t, -1)[r], **TOL[torch.float64])
    return True


# ------------------------------------------------------------------------------ whole model

def _threshold_tables(layers: int = 2) -> dict:
    """A ``--qsparse-mode threshold`` calibration for ``layers`` blocks: the same geometric table
    (thresholds 1e-3 .. 1 over the sparsity levels) for every projection."""
    table = [0.0] + [1e-3 * 10 ** (3 * i / 100) for i in range(1, 101)]
    return {"method": "threshold", "levels": 100, "tokens": 0,
            "thresholds": {f"layer{i}/{k}": table for i in range(layers)
                           for k in ("qkv", "o", "gate_up", "down")}}


VARIANTS = {
    # top-K on both sides of the selection (o: K = 0.6 d keeps the larger side; down: K = 0.25 d);
    # relu2_glu leaves exact zeros before `down`, i.e. many ties at the threshold
    "topk": ({}, {"ratio": 0.5, "o_ratio": 0.4, "down_ratio": 0.75}),
    "topk-swiglu-bias-untied": ({"ffn_type": "swiglu", "add_bias_linear": True,
                                 "untie_embeddings_and_output_weights": True},
                                {"ratio": 0.5, "o_ratio": 0.4, "down_ratio": 0.75}),
    "topk-no-ste": ({}, {"ratio": 0.5, "ste": False}),
    "topk-l2": ({"ffn_type": "swiglu"}, {"ratio": 0.6, "rescale": "l2"}),
    "int8-topk": ({}, {"ratio": 0.5, "quantize_activations": True}),
    "block-2:4": ({}, {"mode": "block", "block": "2:4"}),
    "relu": ({"ffn_type": "swiglu"}, {"mode": "relu"}),
    "bitnet-topk": ({}, {"bitnet": True, "ratio": 0.4}),
    "none": ({}, {"mode": "none"}),
    # TEAL: elementwise |x| >= t per (layer, kind); with int8 the row-wide gamma is agreed first
    # (ratios picked so that every kind keeps a part of its input: the table maps S to
    # 1e-3 * 10^(3 S), and the inputs of o and down are much smaller than the normed ones)
    "threshold": ({}, {"mode": "threshold", "ratio": 0.9, "o_ratio": 0.6, "down_ratio": 0.1,
                       "calibration": _threshold_tables()}),
    "threshold-int8": ({"ffn_type": "swiglu"}, {"mode": "threshold", "ratio": 0.9,
                                                "o_ratio": 0.6, "down_ratio": 0.4,
                                                "quantize_activations": True,
                                                "calibration": _threshold_tables()}),
    "none-swiglu": ({"ffn_type": "swiglu"}, {"mode": "none"}),
}

V = 128


def model_cfg(**kw) -> ModelConfig:
    base = dict(num_layers=2, hidden_size=64, num_attention_heads=8, num_query_groups=4,
                seq_length=16, ffn_hidden_size=128)
    base.update(kw)
    return ModelConfig(**base)


@contextlib.contextmanager
def capture_sparse_inputs(model: torch.nn.Module, into: dict):
    """Record the sparsified input of every projection, keyed by module name: column-parallel
    layers through a hook on their sparsifier, row-parallel ones through ``sparsify_sharded``."""
    names = {id(m.sparsifier): n for n, m in model.named_modules()
             if isinstance(m, (ColumnParallelLinear, RowParallelLinear)) and m.sparsifier}
    handles = [m.sparsifier.register_forward_hook(
        lambda mod, args, out, n=n: into.__setitem__(n, out.detach()))
        for n, m in model.named_modules() if isinstance(m, ColumnParallelLinear) and m.sparsifier]
    original = player.sparsify_sharded

    def recording(sp, x, st):
        y = original(sp, x, st)
        if id(sp) in names:  # another model's layer
            into[names[id(sp)]] = y.detach()
        return y

    player.sparsify_sharded = recording
    try:
        yield into
    finally:
        player.sparsify_sharded = original
        for h in handles:
            h.remove()


def build_pair(variant: str, tp: int, dtype: torch.dtype, seed: int = 0):
    """(reference TP = 1 model, TP model holding the same weights, TP state, config)."""
    st = state(world()) if tp == world() else state(tp)
    model_kw, q_kw = VARIANTS[variant]
    cfg = model_cfg(**model_kw)
    qcfg = QSparseConfig(**q_kw)
    torch.manual_seed(seed)
    ref = GPTModel(cfg.with_sparsity(qcfg), V, parallel=ParallelState.single())
    torch.manual_seed(seed)
    tpm = GPTModel(cfg.with_sparsity(qcfg), V, parallel=st)
    shards = shard_state_dict(ref.state_dict(), st.tp_rank, st.tp_size, cfg)
    for name, p in tpm.state_dict().items():  # TP-invariant initialisation
        assert torch.equal(p, shards[name]), f"init of {name} differs from the TP=1 shard"
    tpm.load_state_dict(shards)
    return ref.to(dtype), tpm.to(dtype), st, cfg


def check_model(variant: str, dtype_name: str) -> dict:
    """Logits, per-token loss, every gathered gradient and every sparsified input (masks element
    for element) of the TP model equal the single-process model's."""
    dtype = getattr(torch, dtype_name)
    ref, tpm, st, cfg = build_pair(variant, world(), dtype)
    g = torch.Generator().manual_seed(7)
    tokens = torch.randint(0, V, (2, 16), generator=g)
    labels = torch.randint(0, V, (2, 16), generator=g)
    labels[1, -3:] = -100
    tol = TOL[dtype]
    if VARIANTS[variant][1].get("rescale") == "l2":
        tol = TOL[torch.float32]  # the method computes the L2 scale in fp32 (sparsity._l2_scale)

    ref_in, tp_in = {}, {}
    with capture_sparse_inputs(ref, ref_in), capture_sparse_inputs(tpm, tp_in):
        torch.testing.assert_close(tpm(tokens), ref(tokens), **tol)
        reset_density(ref), reset_density(tpm)
        loss_ref, loss = ref(tokens, labels), tpm(tokens, labels)
    torch.testing.assert_close(loss, loss_ref, **tol)
    assert set(ref_in) == set(tp_in) and len(ref_in) == 4 * cfg.num_layers, sorted(tp_in)
    mask_diffs, significant = 0, 0
    for name, want in ref_in.items():
        got = tp_in[name]
        if isinstance(tpm.get_submodule(name), RowParallelLinear):
            got = gather_last(got, st)
        differ = (got != 0) != (want != 0)
        mask_diffs += int(differ.sum())
        # an entry that is 0 on one side and rounding noise (relative to its row) on the other
        # is not a different selection but a different value
        scale = want.abs().amax(-1, keepdim=True)
        significant += int((differ & (torch.maximum(got.abs(), want.abs()) > 1e-6 * scale)).sum())
        if dtype == torch.float64:
            torch.testing.assert_close(got, want, **tol)
    dens_ref, dens = collect_density(ref), collect_density(tpm)
    assert dens.keys() == dens_ref.keys()
    for k in dens:
        slack = 1e-12 if dtype == torch.float64 else 1e-3
        assert abs(dens[k] - dens_ref[k]) < slack, (k, dens[k], dens_ref[k])

    loss_ref.mean().backward()
    loss.mean().backward()
    grads = gather_model_state_dict(tpm, st, grads=True)
    ref_grads = {n: p.grad for n, p in ref.named_parameters()}
    assert grads.keys() == ref_grads.keys()
    worst = 0.0
    for name, want in ref_grads.items():
        torch.testing.assert_close(grads[name], want, **tol, msg=lambda m, n=name: f"{n}: {m}")
        worst = max(worst, ((grads[name] - want).abs() / (want.abs() + 1e-6)).max().item())
    return {"mask_diffs": mask_diffs, "significant_mask_diffs": significant,
            "worst_rel_grad": worst}


def check_dropout_rng(seed: int) -> dict:
    """Replicated activations drop the same elements on every TP rank, the TP-split attention
    heads draw per-rank masks, and the tracker state replays."""
    st = state(world())
    st.seed(seed)
    cfg = model_cfg(hidden_dropout=0.2, attention_dropout=0.2)
    torch.manual_seed(seed)
    m = GPTModel(cfg.with_sparsity(QSparseConfig(ratio=0.5)), V, parallel=st).train()
    tokens = torch.randint(0, V, (2, 16), generator=torch.Generator().manual_seed(1))
    hidden = {}
    m.final_norm.register_forward_hook(lambda mod, a, out: hidden.__setitem__("h", a[0].detach()))
    torch.manual_seed(seed + 1)
    tracker_before = st.rng.get_states()
    out1 = m(tokens)
    h1 = hidden["h"]
    same_hidden = all(torch.equal(h1, o) for o in _all_gather_list(h1, st))
    with st.fork_rng():
        own = torch.rand(4)
    draws = _all_gather_list(own, st)
    per_rank_differ = all(not torch.equal(draws[0], d) for d in draws[1:])
    # replay: same default and tracker state -> same output
    st.rng.set_states(tracker_before)
    torch.manual_seed(seed + 1)
    out2 = m(tokens)
    return {"same_hidden": same_hidden, "per_rank_differ": per_rank_differ,
            "replays": torch.equal(out1, out2)}


def _all_gather_list(t: torch.Tensor, st: ParallelState) -> list[torch.Tensor]:
    parts = [torch.empty_like(t) for _ in range(st.tp_size)]
    dist.all_gather(parts, t.contiguous(), group=st.tp_group)
    return parts


# ------------------------------------------------------------------------------ training


def check_training(variant: str, tp: int, steps: int = 4) -> list[tuple[float, float]]:
    """AdamW steps of the TP x DP model (each DP rank a different half of the batch, gradients
    averaged over DP) against the single-process model on the whole batch: per-step losses."""
    ref, tpm, st, cfg = build_pair(variant, tp, torch.float32, seed=1)
    opt_ref = torch.optim.AdamW(ref.parameters(), lr=3e-3, weight_decay=0.1)
    opt = torch.optim.AdamW(tpm.parameters(), lr=3e-3, weight_decay=0.1)
    g = torch.Generator().manual_seed(11)
    out = []
    for _ in range(steps):
        batch = torch.randint(0, V, (4, 17), generator=g)
        tokens, labels = batch[:, :-1], batch[:, 1:]
        loss_ref = ref(tokens, labels).mean()
        opt_ref.zero_grad()
        loss_ref.backward()
        opt_ref.step()
        mine = slice(st.dp_rank * 4 // st.dp_size, (st.dp_rank + 1) * 4 // st.dp_size)
        loss = tpm(tokens[mine], labels[mine]).mean()
        opt.zero_grad()
        loss.backward()
        if st.dp_size > 1:
            for p in tpm.parameters():
                dist.all_reduce(p.grad, group=st.dp_group)
                p.grad /= st.dp_size
            lt = loss.detach().reshape(1).clone()
            dist.all_reduce(lt, group=st.dp_group)
            loss = lt[0] / st.dp_size
        opt.step()
        out.append((loss_ref.item(), loss.item()))
    full = gather_model_state_dict(tpm, st)
    for name, p in ref.named_parameters():
        torch.testing.assert_close(full[name], p.detach(), rtol=1e-4, atol=1e-5,
                                   msg=lambda m, n=name: f"{n} after training: {m}")
    return out


# ------------------------------------------------------------------------------ layers alone


def check_layers(variant: str) -> bool:
    """Column- and row-parallel layers on the *same* input as the single-process layer: outputs,
    input and weight gradients, and the kept set element for element (fp32, no rounding in the
    way of the masks)."""
    st = state(world())
    t, r = st.tp_size, st.tp_rank
    _, q_kw = VARIANTS[variant]
    qcfg = QSparseConfig(**q_kw)
    g = torch.Generator().manual_seed(5)
    d_in, d_out = 16 * t, 12 * t
    x = torch.randn(3, 5, d_in, generator=g)
    x[0, 0, : d_in // 2] = 0.0  # ties at zero straddling the shards
    x[1] = x[1].round()  # small integers: many ties
    single = ParallelState.single()
    for cls, kind in ((ColumnParallelLinear, "gate_up"), (RowParallelLinear, "down")):
        layers = []
        for ps in (single, st):
            torch.manual_seed(2)
            layers.append(cls(d_in, d_out, bias=True, sparsifier=Sparsifier(qcfg, kind, 0),
                              bitnet=qcfg.bitnet, parallel=ps))
        ref, par = layers
        xr = x.clone().requires_grad_()
        xin = x.clone() if cls is ColumnParallelLinear else x.chunk(t, -1)[r].clone()
        xin.requires_grad_()
        seen_ref, seen = {}, {}
        ref.sparsifier.register_forward_hook(lambda m, a, o: seen_ref.__setitem__("y", o))
        if cls is ColumnParallelLinear:
            par.sparsifier.register_forward_hook(lambda m, a, o: seen.__setitem__("y", o))
        else:
            original = player.sparsify_sharded

            def recording(sp, xx, ps, original=original, seen=seen):
                y = original(sp, xx, ps)
                if ps is st:  # the single-process layer calls it too (it then is sp(x))
                    seen["y"] = y
                return y

            player.sparsify_sharded = recording
        try:
            y_ref, y = ref(xr), par(xin)
        finally:
            if cls is RowParallelLinear:
                player.sparsify_sharded = original
        if cls is ColumnParallelLinear:
            y = gather_from_tensor_parallel(y, st)
        torch.testing.assert_close(y, y_ref, **TOL[torch.float32])
        kept = seen["y"] if cls is ColumnParallelLinear else gather_last(seen["y"], st)
        assert torch.equal(kept != 0, seen_ref["y"] != 0), f"{cls.__name__} kept set differs"
        upstream = torch.randn(y_ref.shape, generator=g)
        (y_ref * upstream).sum().backward()
        (y * upstream).sum().backward()
        want_gx = xr.grad if cls is ColumnParallelLinear else xr.grad.chunk(t, -1)[r]
        torch.testing.assert_close(xin.grad, want_gx, **TOL[torch.float32])
        torch.testing.assert_close(gather_tensor(par.weight.grad, par.weight, st),
                                   ref.weight.grad, **TOL[torch.float32])
    return True
