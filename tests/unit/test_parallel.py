"""Tensor-parallel pieces that need no process group: degrees and their validation, the single and
virtual states, sharding of (fused) weights and whole state dicts, shape errors, the RNG tracker.
(The multi-process equivalence tests are in tests/distributed/.)"""

from __future__ import annotations

import pytest
import torch

from megatron_qsparse.config import ConfigError, ModelConfig
from megatron_qsparse.model import GPTModel, count_parameters
from megatron_qsparse.model.sharding import gather_state_dicts, partition_specs, shard_state_dict
from megatron_qsparse.parallel import (ColumnParallelLinear, ParallelDims, ParallelState,
                                       RowParallelLinear, VocabParallelEmbedding,
                                       get_parallel_state)
from megatron_qsparse.parallel.sharding import merge_shards, shard_tensor
from megatron_qsparse.parallel.sparsify import candidate_count
from megatron_qsparse.parallel.state import using
from megatron_qsparse.training import checkpointing

CFG = dict(num_layers=2, hidden_size=64, num_attention_heads=8, num_query_groups=4,
           seq_length=16, ffn_hidden_size=128)


def test_dims_from_world():
    assert ParallelDims.from_world(8, tp=2, pp=2) == ParallelDims(tp=2, pp=2, dp=2)
    assert ParallelDims.from_world(1).world_size == 1
    with pytest.raises(ConfigError, match=r"^--tensor-model-parallel-size: world size 6 is not "
                                          r"divisible by TP x PP = 4 x 1 = 4; launch a multiple"):
        ParallelDims.from_world(6, tp=4)
    with pytest.raises(ConfigError, match="--pipeline-model-parallel-size: got 0"):
        ParallelDims.from_world(4, pp=0)


def test_single_state_needs_no_process_group():
    st = get_parallel_state()
    assert (st.tp_size, st.tp_rank, st.dp_size, st.pp_size) == (1, 0, 1, 1)
    assert st.tp_group is None and not torch.distributed.is_initialized()
    mpu = st.mpu()
    assert mpu.get_tensor_model_parallel_world_size() == 1
    assert mpu.get_data_parallel_world_size() == 1 and mpu.get_model_parallel_rank() == 0
    with st.fork_rng():  # a no-op at TP = 1
        pass
    with pytest.raises(ConfigError, match="--tensor-model-parallel-size"):
        ParallelState.build(tp=2)  # no processes to split over


def test_shard_and_merge_fused_parts():
    full = torch.arange(12 * 3).view(12, 3)
    sizes = (4, 4, 4)  # e.g. [q; k; v]
    shards = [shard_tensor(full, 0, sizes, r, 2) for r in range(2)]
    assert shards[0][:, 0].tolist() == [0, 3, 12, 15, 24, 27]  # its half of each part
    assert torch.equal(merge_shards(shards, 0, sizes), full)
    cols = [shard_tensor(full, 1, (3,), r, 3) for r in range(3)]
    assert torch.equal(merge_shards(cols, 1, (3,)), full)
    with pytest.raises(ValueError, match="not divisible"):
        shard_tensor(full, 0, (6, 6), 0, 4)


def test_virtual_model_holds_this_ranks_shards():
    cfg = ModelConfig(**CFG)
    m = GPTModel(cfg, 128, parallel=ParallelState.virtual_tp(4, 1))
    att = m.layers[0].attention
    assert (att.nq, att.nkv) == (2, 1)
    assert att.qkv.weight.shape == ((2 + 2 * 1) * 8, 64)
    assert att.o.weight.shape == (64, 16)
    assert m.layers[0].mlp.gate_up.weight.shape == (2 * 32, 64)
    assert m.layers[0].mlp.down.weight.shape == (64, 32)
    assert m.embedding.weight.shape == (32, 64) and m.embedding.vocab_start == 32
    assert att.qkv.weight.tensor_model_parallel and not hasattr(m.final_norm.weight,
                                                                "tensor_model_parallel")
    full = GPTModel(cfg, 128, parallel=ParallelState.single())
    assert count_parameters(m) == count_parameters(full)  # counted over the shards
    specs = partition_specs(cfg, 128, 4)
    assert specs["layers.0.attention.qkv.weight"] == (0, (64, 32, 32))
    assert specs["layers.0.mlp.down.weight"] == (1, (128,))
    assert specs["final_norm.weight"] is None


@pytest.mark.parametrize("tp", [2, 4])
def test_shard_state_dict_round_trip_and_tp_invariant_init(tp):
    cfg = ModelConfig(**CFG, untie_embeddings_and_output_weights=True, add_bias_linear=True)
    torch.manual_seed(0)
    ref = GPTModel(cfg, 128, parallel=ParallelState.single())
    sd = ref.state_dict()
    shards = [shard_state_dict(sd, r, tp, cfg) for r in range(tp)]
    merged = gather_state_dicts(shards, cfg)
    assert merged.keys() == sd.keys()
    for k in sd:
        assert torch.equal(merged[k], sd[k]), k
    # a TP rank built from the same seed starts from exactly its shard of the TP = 1 weights
    for r in (0, tp - 1):
        torch.manual_seed(0)
        m = GPTModel(cfg, 128, parallel=ParallelState.virtual_tp(tp, r))
        for k, v in m.state_dict().items():
            assert torch.equal(v, shards[r][k]), (r, k)
    # rank 1's fused QKV: its q heads, then the k and v heads of its query groups
    q1 = shards[1]["layers.0.attention.qkv.weight"]
    nq, nkv, hd = 8 // tp, 4 // tp, 8
    full_qkv = sd["layers.0.attention.qkv.weight"]
    assert torch.equal(q1[:nq * hd], full_qkv[nq * hd:2 * nq * hd])
    assert torch.equal(q1[nq * hd:(nq + nkv) * hd], full_qkv[64 + nkv * hd:64 + 2 * nkv * hd])


@pytest.mark.parametrize("kw,needle", [
    (dict(num_attention_heads=6, num_query_groups=6, hidden_size=48),
     "--num-attention-heads: 6 is not divisible by the tensor-parallel size 4"),
    (dict(num_query_groups=2), "--num-query-groups: 2 is not divisible by the tensor-parallel "
                               "size 4"),
    (dict(ffn_hidden_size=102), "--ffn-hidden-size: 102 is not divisible"),
])
def test_impossible_shapes_are_one_line_errors(kw, needle):
    cfg = ModelConfig(**{**CFG, **kw})
    with pytest.raises(ValueError, match=needle):
        GPTModel(cfg, 128, parallel=ParallelState.virtual_tp(4, 0))
    with pytest.raises(ValueError, match="padded vocabulary size"):
        VocabParallelEmbedding(130, 8, parallel=ParallelState.virtual_tp(4, 0))
    with pytest.raises(ValueError, match="ColumnParallelLinear output size: 6 is not divisible"):
        ColumnParallelLinear(8, 6, parallel=ParallelState.virtual_tp(4, 0))
    with pytest.raises(ValueError, match="RowParallelLinear input size: 6 is not divisible"):
        RowParallelLinear(6, 8, parallel=ParallelState.virtual_tp(4, 0))


def test_virtual_state_cannot_run_collectives():
    layer = RowParallelLinear(8, 4, parallel=ParallelState.virtual_tp(2, 0))
    with pytest.raises(RuntimeError, match="virtual"):
        layer(torch.randn(3, 4))


def test_candidate_count():
    # K = 6 of 10 keeps the larger side: the 5 smallest decide; capped at the slice width
    assert candidate_count(10, 6, 2) == 5 and candidate_count(10, 6, 5) == 2
    assert candidate_count(4096, 1229, 2) == 1229 and candidate_count(4096, 4096, 2) == 0


def test_config_accepts_tensor_parallelism():
    from megatron_qsparse.arguments import parse

    cfg = parse(["--data-path", "x", "--tokenizer-type", "ByteTokenizer",
                 "--tensor-model-parallel-size", "2"])
    assert cfg.parallel.tensor_model_parallel_size == 2


def test_rng_tracker_forks_and_is_checkpointed():
    st = ParallelState.virtual_tp(2, 1)
    st.seed(7)
    torch.manual_seed(0)
    before = torch.get_rng_state()
    with st.fork_rng():
        a = torch.rand(3)
    assert torch.equal(torch.get_rng_state(), before)  # the default generator is untouched
    other = ParallelState.virtual_tp(2, 0)
    other.seed(7)
    with other.fork_rng():
        assert not torch.equal(torch.rand(3), a)  # another TP rank draws other numbers
    with using(st):
        saved = checkpointing.rng_state()
        with st.fork_rng():
            b = torch.rand(3)
        checkpointing.set_rng_state(saved)
        with st.fork_rng():
            assert torch.equal(torch.rand(3), b)  # restored from the checkpoint's RNG state
    with pytest.raises(RuntimeError, match="never seeded"):
        with ParallelState.virtual_tp(2, 0).fork_rng():
            pass
