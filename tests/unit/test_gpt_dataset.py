"""GPT sample indices, caching, splits, blending, argument parsing and the pretraining sampler."""

import collections
import math
import os

import numpy as np
import pytest
import torch

from megatron_qsparse.data.gpt_dataset import (
    BlendedDataset,
    GPTDataset,
    blending_indices,
    build_train_valid_test_datasets,
    parse_data_path,
    parse_split,
    split_document_ranges,
)
from megatron_qsparse.data.indexed_dataset import IndexedDataset, IndexedDatasetBuilder
from megatron_qsparse.data.sampler import MegatronPretrainingSampler, build_pretraining_data_loader


def make_dataset(prefix, lengths, start=0, dtype=np.uint16):
    """Documents of the given lengths whose tokens are consecutive integers (all distinct)."""
    with IndexedDatasetBuilder(str(prefix), dtype) as builder:
        value = start
        for n in lengths:
            builder.add_document(np.arange(value, value + n) % 60000)
            value += n
    return IndexedDataset(str(prefix))


def naive_stream(indexed, document_order):
    return np.concatenate([np.asarray(indexed[int(d)], dtype=np.int64) for d in document_order])


def test_samples_are_windows_of_the_stream(tmp_path):
    lengths = [7, 1, 13, 4, 9, 2, 11]
    ds = make_dataset(tmp_path / "d", lengths)
    seq = 5
    per_epoch = (sum(lengths) - 1) // seq  # 46 tokens -> 9 full samples
    g = GPTDataset(ds, np.arange(len(lengths)), per_epoch, seq, seed=3, cache_dir=str(tmp_path))
    assert len(g) == per_epoch and g.num_epochs == 1
    # the epoch is a permutation of the documents
    assert sorted(np.asarray(g.document_index).tolist()) == list(range(len(lengths)))
    stream = naive_stream(ds, g.document_index)
    expected = [stream[j * seq:(j + 1) * seq + 1] for j in range(per_epoch)]
    got = [g[i]["tokens"] for i in range(len(g))]
    for s in got:
        assert s.dtype == np.int64 and s.shape == (seq + 1,)
    # same multiset of samples (the shuffle only reorders them) ...
    assert sorted(map(tuple, got)) == sorted(map(tuple, expected))
    # ... in the order given by the shuffle index
    for i, s in enumerate(got):
        np.testing.assert_array_equal(s, expected[int(g.shuffle_index[i])])
    # together the samples cover the stream: inputs tile it exactly
    inputs = np.concatenate([expected[j][:-1] for j in range(per_epoch)])
    np.testing.assert_array_equal(inputs, stream[:per_epoch * seq])
    assert sorted(np.concatenate([s[:-1] for s in got]).tolist()) == sorted(inputs.tolist())
    # the shuffle is a real permutation, not the identity
    assert sorted(np.asarray(g.shuffle_index).tolist()) == list(range(per_epoch))


def test_multi_epoch_on_small_dataset(tmp_path):
    lengths = [3, 5, 2, 6]  # 16 tokens per epoch
    ds = make_dataset(tmp_path / "small", lengths)
    seq, n = 4, 30  # needs 121 tokens -> 8 epochs
    g = GPTDataset(ds, np.arange(4), n, seq, seed=1, cache_dir=str(tmp_path))
    assert g.num_epochs == math.ceil((n * seq + 1) / 16) == 8
    doc_index = np.asarray(g.document_index)
    for e in range(g.num_epochs):  # every epoch visits every document once
        assert sorted(doc_index[4 * e:4 * e + 4].tolist()) == [0, 1, 2, 3]
    assert any(not np.array_equal(doc_index[:4], doc_index[4 * e:4 * e + 4])
               for e in range(1, g.num_epochs))  # epochs are shuffled differently
    stream = naive_stream(ds, doc_index)
    expected = sorted(tuple(stream[j * seq:(j + 1) * seq + 1]) for j in range(n))
    assert sorted(tuple(g[i]["tokens"]) for i in range(n)) == expected
    # each token value appears as often as the number of epochs it was fully used in (±1)
    counts = collections.Counter(np.concatenate([g[i]["tokens"][:-1] for i in range(n)]).tolist())
    assert set(counts) == set(range(16))
    assert all(n * seq // 16 <= c <= n * seq // 16 + 1 for c in counts.values())


def test_determinism_and_cache(tmp_path, caplog):
    ds = make_dataset(tmp_path / "c", [5, 8, 3, 9, 4, 7])
    cache = tmp_path / "cache"
    a = GPTDataset(ds, np.arange(6), 12, 4, seed=7, cache_dir=str(cache), name="train")
    assert not a.loaded_from_cache
    files = sorted(os.listdir(cache))
    assert len(files) == 4 and all(f.startswith("c_train_") for f in files)
    assert all(os.path.isfile(p) for p in a.cache_files)
    b = GPTDataset(ds, np.arange(6), 12, 4, seed=7, cache_dir=str(cache), name="train")
    assert b.loaded_from_cache
    assert sorted(os.listdir(cache)) == files  # nothing new written, no temporary files
    for i in range(12):
        np.testing.assert_array_equal(a[i]["tokens"], b[i]["tokens"])
    # a different seed: different order, not a cache hit
    c = GPTDataset(ds, np.arange(6), 12, 4, seed=8, cache_dir=str(cache), name="train")
    assert not c.loaded_from_cache
    assert any(not np.array_equal(a[i]["tokens"], c[i]["tokens"]) for i in range(12))
    # rebuilding without cache gives the same indices (determinism, not only caching)
    d = GPTDataset(ds, np.arange(6), 12, 4, seed=7, cache_dir=str(tmp_path / "fresh"))
    assert not d.loaded_from_cache
    np.testing.assert_array_equal(d.shuffle_index, a.shuffle_index)
    np.testing.assert_array_equal(d.sample_index, a.sample_index)
    # default cache location: next to the data
    e = GPTDataset(ds, np.arange(6), 12, 4, seed=7, cache_dir=None)
    assert all(os.path.dirname(p) == str(tmp_path) for p in e.cache_files)
    assert GPTDataset(ds, np.arange(6), 12, 4, seed=7, cache_dir=None).loaded_from_cache
    # a corrupt cache file is rebuilt, not trusted
    with open(a.cache_files[2], "wb") as f:
        f.write(b"garbage")
    f = GPTDataset(ds, np.arange(6), 12, 4, seed=7, cache_dir=str(cache), name="train")
    assert not f.loaded_from_cache
    np.testing.assert_array_equal(f.shuffle_index, a.shuffle_index)


def test_unwritable_cache_falls_back_to_memory(tmp_path):
    ds = make_dataset(tmp_path / "ro", [6, 6, 6])
    blocker = tmp_path / "file"
    blocker.write_text("x")  # a file where the cache directory should be
    g = GPTDataset(ds, np.arange(3), 3, 4, seed=0, cache_dir=str(blocker / "sub"))
    assert len(g) == 3 and g[0]["tokens"].shape == (5,)


def test_dataset_errors(tmp_path):
    ds = make_dataset(tmp_path / "e", [3, 2])
    with pytest.raises(ValueError, match="valid split of .* has no documents"):
        GPTDataset(ds, np.arange(0), 4, 4, seed=0, cache_dir=str(tmp_path), name="valid")
    with pytest.raises(ValueError, match="5 tokens in 2 documents, fewer than one sample"):
        GPTDataset(ds, np.arange(2), 4, 8, seed=0, cache_dir=str(tmp_path))
    with pytest.raises(ValueError, match="out of range"):
        GPTDataset(ds, np.array([0, 2]), 4, 2, seed=0, cache_dir=str(tmp_path))


def test_parse_data_path():
    assert parse_data_path(["a"]) == ([1.0], ["a"])
    assert parse_data_path(["a", "b"]) == ([0.5, 0.5], ["a", "b"])
    w, p = parse_data_path(["0.3", "a", "0.9", "b"])
    assert p == ["a", "b"] and w == pytest.approx([0.25, 0.75])
    assert parse_data_path(["1", "a", "0", "b"]) == ([1.0, 0.0], ["a", "b"])
    for bad, pattern in [([], "empty"), (["0.3", "a", "0.7"], "pairs"),
                         (["0.3", "a", "x", "b"], "'x' .* is not a number"),
                         (["-1", "a", "2", "b"], "negative"),
                         (["0", "a", "0", "b"], "sum to 0"),
                         (["a", "0.5", "b"], "mixes prefixes"),
                         (["0.5", "0.5"], "prefix was expected")]:
        with pytest.raises(ValueError, match=pattern):
            parse_data_path(bad)


def test_parse_split():
    assert parse_split("969,30,1") == pytest.approx((0.969, 0.030, 0.001))
    assert parse_split("98,2,0") == pytest.approx((0.98, 0.02, 0.0))
    assert parse_split("1,0,0") == (1.0, 0.0, 0.0)
    assert parse_split("98/2/0") == pytest.approx((0.98, 0.02, 0.0))
    assert parse_split("98,2") == pytest.approx((0.98, 0.02, 0.0))
    assert parse_split("1") == (1.0, 0.0, 0.0)
    for bad, pattern in [("", "1 to 3 numbers"), ("1,2,3,4", "1 to 3 numbers"),
                         ("a,b,c", "not a number"), ("90,-10,20", "negative"),
                         ("0,0,0", "sums to 0"), ("90,,10", "1 to 3 numbers")]:
        with pytest.raises(ValueError, match=pattern):
            parse_split(bad)


def test_split_proportions(tmp_path):
    assert split_document_ranges((0.969, 0.03, 0.001), 1000) == [0, 969, 999, 1000]
    assert split_document_ranges((0.8, 0.1, 0.1), 10) == [0, 8, 9, 10]
    assert split_document_ranges((1.0, 0.0, 0.0), 7) == [0, 7, 7, 7]
    for n in range(1, 60):
        b = split_document_ranges(parse_split("7,2,1"), n)
        assert b[0] == 0 and b[-1] == n and b == sorted(b)
    ds = make_dataset(tmp_path / "s", [10] * 20)
    train, valid, test = build_train_valid_test_datasets(
        [str(tmp_path / "s")], "70,20,10", seq_length=8, seed=1, num_samples=(30, 5, 2),
        cache_dir=str(tmp_path / "cache"))
    assert (len(train), len(valid), len(test)) == (30, 5, 2)
    assert sorted(set(train.document_ids.tolist())) == list(range(0, 14))
    assert sorted(set(valid.document_ids.tolist())) == list(range(14, 18))
    assert sorted(set(test.document_ids.tolist())) == list(range(18, 20))
    # tokens of each split come only from that split's documents (doc d holds 10d..10d+9)
    for split, docs in ((train, range(0, 14)), (valid, range(14, 18)), (test, range(18, 20))):
        values = np.concatenate([split[i]["tokens"] for i in range(len(split))])
        assert set((values // 10).tolist()) <= set(docs)
    # zero share or zero samples -> None
    t, v, s = build_train_valid_test_datasets([str(tmp_path / "s")], "1,0,0", 8, 1, (4, 4, 4),
                                              cache_dir=str(tmp_path / "cache"))
    assert t is not None and v is None and s is None
    t, v, s = build_train_valid_test_datasets([str(tmp_path / "s")], "8,1,1", 8, 1, (4, 0, 3),
                                              cache_dir=str(tmp_path / "cache"))
    assert v is None and len(s) == 3


def test_blending_proportions(tmp_path):
    rng = np.random.default_rng(0)
    for _ in range(30):
        k = int(rng.integers(1, 5))
        w = rng.random(k) + 0.05
        w /= w.sum()
        n = int(rng.integers(1, 300))
        dataset_index, sample_index = blending_indices(w, n)
        for d in range(k):
            counts = np.cumsum(dataset_index == d)
            targets = w[d] * np.arange(1, n + 1)
            assert np.all(np.abs(counts - targets) <= 1.0)  # within one sample at every prefix
            assert counts[-1] <= math.ceil(w[d] * n * 1.005)  # Megatron's margin is enough
            np.testing.assert_array_equal(sample_index[dataset_index == d], np.arange(counts[-1]))
    np.testing.assert_array_equal(blending_indices([0.5, 0.5], 6)[0], [0, 1, 0, 1, 0, 1])

    a = make_dataset(tmp_path / "a", [50] * 10, start=0)
    b = make_dataset(tmp_path / "b", [50] * 10, start=10000)
    n = 200
    train, valid, test = build_train_valid_test_datasets(
        ["0.25", str(tmp_path / "a"), "0.75", str(tmp_path / "b")], "1,0,0", seq_length=16,
        seed=5, num_samples=(n, 0, 0), cache_dir=str(tmp_path / "cache"))
    assert isinstance(train, BlendedDataset) and valid is None and test is None
    assert [len(d) for d in train.datasets] == [math.ceil(0.25 * n * 1.005),
                                                math.ceil(0.75 * n * 1.005)]
    from_b = sum(int(train[i]["tokens"][0] >= 10000) for i in range(n))
    assert abs(from_b - 0.75 * n) <= 1
    again = build_train_valid_test_datasets(
        ["0.25", str(tmp_path / "a"), "0.75", str(tmp_path / "b")], "1,0,0", 16, 5, (n, 0, 0),
        cache_dir=str(tmp_path / "cache"))[0]
    assert all(np.array_equal(train[i]["tokens"], again[i]["tokens"]) for i in range(0, n, 7))
    with pytest.raises(ValueError, match="has only"):
        BlendedDataset(train.datasets, [0.5, 0.5], 1000)


# ----------------------------------------------------------------------------- sampler
def test_sampler_partitions_micro_batches():
    total, mbs, dp = 50, 2, 3
    for consumed in (0, 6, 7):
        per_rank = [list(MegatronPretrainingSampler(total, consumed, mbs, r, dp)) for r in range(dp)]
        steps = len(per_rank[0])
        assert all(len(p) == steps for p in per_rank)
        assert steps == (total - consumed) // (mbs * dp)
        for r in range(dp):
            assert len(MegatronPretrainingSampler(total, consumed, mbs, r, dp)) == steps
        for s in range(steps):
            merged = [i for r in range(dp) for i in per_rank[r][s]]
            start = consumed + s * mbs * dp
            assert merged == list(range(start, start + mbs * dp))  # ranks partition the step
    # resuming continues exactly where the first run stopped
    full = list(MegatronPretrainingSampler(total, 0, mbs, 1, dp))
    resumed = list(MegatronPretrainingSampler(total, 3 * mbs * dp, mbs, 1, dp))
    assert resumed == full[3:]
    tail = list(MegatronPretrainingSampler(10, 0, 2, 0, 2, drop_last=False))
    assert tail == [[0, 1], [4, 5], [8, 9]]
    assert list(MegatronPretrainingSampler(10, 0, 2, 1, 2, drop_last=False)) == [[2, 3], [6, 7]]
    for kwargs, pattern in [(dict(total_samples=0), "no samples"),
                            (dict(consumed_samples=50), "exhausted"),
                            (dict(data_parallel_rank=3), "not in"),
                            (dict(micro_batch_size=0), "micro_batch_size")]:
        args = dict(total_samples=50, consumed_samples=0, micro_batch_size=2,
                    data_parallel_rank=0, data_parallel_size=3)
        args.update(kwargs)
        with pytest.raises(ValueError, match=pattern):
            MegatronPretrainingSampler(**args)


def test_data_loader(tmp_path):
    ds = make_dataset(tmp_path / "l", [40] * 5)
    g = GPTDataset(ds, np.arange(5), 20, 8, seed=2, cache_dir=str(tmp_path))
    loader = build_pretraining_data_loader(g, consumed_samples=4, micro_batch_size=2,
                                           dp_rank=1, dp_size=2)
    batches = list(loader)
    assert len(batches) == len(loader) == 4
    assert batches[0]["tokens"].dtype == torch.int64
    assert batches[0]["tokens"].shape == (2, 9)
    np.testing.assert_array_equal(batches[0]["tokens"][1].numpy(), g[7]["tokens"])
    assert build_pretraining_data_loader(None, 0, 2, 0, 1) is None


# ----------------------------------------------------------------------------- blends, scale
def test_blend_weight_that_is_not_a_number_names_the_flag():
    for bad, shown in [(["0.3", "a", "x7", "b"], "'x7' (entry 3)"),
                       (["0.3a", "a", "0.7", "b"], "'0.3a' (entry 1)"),
                       (["nan", "a", "1", "b"], "'nan' (entry 1)")]:
        with pytest.raises(ValueError) as info:
            parse_data_path(bad)
        msg = str(info.value)
        assert msg.startswith("--data-path weight ") and shown in msg and "not a number" in msg


def _reference_blend(weights, size):
    """Megatron's greedy, written plainly: the dataset lagging its target the most."""
    counts = [0] * len(weights)
    out = []
    for i in range(size):
        errs = [w * (i + 1) - c for w, c in zip(weights, counts)]
        d = errs.index(max(errs))
        out.append(d)
        counts[d] += 1
    return out


def test_blending_paths_agree_with_the_reference():
    rng = np.random.default_rng(4)
    for k in (1, 2, 3, 9, 33, 50):  # k > 32 takes the numpy path
        w = rng.random(k) + 0.01
        w = (w / w.sum()).tolist()
        dataset_index, sample_index = blending_indices(w, 700)
        assert dataset_index.tolist() == _reference_blend(w, 700), k
        for d in range(k):
            np.testing.assert_array_equal(sample_index[dataset_index == d],
                                          np.arange(int((dataset_index == d).sum())))


def test_blend_of_three_prefixes_hits_its_weights(tmp_path):
    """Stated bound: in every prefix of n blended samples, each dataset supplies within one
    sample of weight * n (here checked on the samples actually served)."""
    starts = (0, 20000, 40000)
    paths = [str(tmp_path / f"p{k}") for k in range(3)]
    for path, start in zip(paths, starts):
        make_dataset(path, [37] * 40, start=start)
    weights = [0.2, 0.5, 0.3]
    n = 500
    data_path = [x for w, p in zip(weights, paths) for x in (str(w), p)]
    train = build_train_valid_test_datasets(data_path, "1", 16, 9, (n, 0, 0),
                                            cache_dir=str(tmp_path / "cache"))[0]
    assert isinstance(train, BlendedDataset) and not train.loaded_from_cache
    source = np.array([int(train[i]["tokens"][0]) // 20000 for i in range(n)])
    for d, w in enumerate(weights):
        counts = np.cumsum(source == d)
        assert np.all(np.abs(counts - w * np.arange(1, n + 1)) <= 1.0), d
    # the blending indices are cached and reused; same seed -> same samples, even rebuilt
    again = build_train_valid_test_datasets(data_path, "1", 16, 9, (n, 0, 0),
                                            cache_dir=str(tmp_path / "cache"))[0]
    assert again.loaded_from_cache
    assert all(os.path.isfile(f) for f in again.cache_files)
    fresh = build_train_valid_test_datasets(data_path, "1", 16, 9, (n, 0, 0),
                                            cache_dir=str(tmp_path / "fresh"))[0]
    assert not fresh.loaded_from_cache
    for i in range(0, n, 11):
        np.testing.assert_array_equal(train[i]["tokens"], again[i]["tokens"])
        np.testing.assert_array_equal(train[i]["tokens"], fresh[i]["tokens"])
    other = build_train_valid_test_datasets(data_path, "1", 16, 10, (n, 0, 0),
                                            cache_dir=str(tmp_path / "cache"))[0]
    assert any(not np.array_equal(train[i]["tokens"], other[i]["tokens"]) for i in range(20))


def _sparse_dataset(prefix, lengths):
    """A uint16 dataset with a real .idx and a sparse .bin (no token data written)."""
    import struct

    n = len(lengths)
    lengths = np.asarray(lengths, dtype=np.int64)
    pointers = np.zeros(n, np.int64)
    np.cumsum(lengths[:-1] * 2, out=pointers[1:])
    with open(prefix + ".idx", "wb") as f:
        f.write(b"MMIDIDX\x00\x00" + struct.pack("<QBQQ", 1, 8, n, n + 1))
        f.write(lengths.astype("<i4").tobytes() + pointers.astype("<i8").tobytes()
                + np.arange(n + 1, dtype="<i8").tobytes())
    with open(prefix + ".bin", "wb") as f:
        f.truncate(int(lengths.sum()) * 2)
    return IndexedDataset(prefix)


def test_index_build_does_not_materialise_tokens(tmp_path):
    """300M tokens: the indices are per document / per sample, never per token."""
    import time
    import tracemalloc

    rng = np.random.default_rng(0)
    lengths = rng.integers(1, 4096, size=150_000)
    ds = _sparse_dataset(str(tmp_path / "big"), lengths)
    seq = 2048
    samples = ds.num_tokens // seq - 1
    tracemalloc.start()
    start = time.perf_counter()
    g = GPTDataset(ds, np.arange(len(ds)), samples, seq, seed=1, cache_dir=str(tmp_path / "c"))
    elapsed = time.perf_counter() - start
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert g.num_epochs == 1 and ds.num_tokens > 3e8
    assert peak < 40e6, peak  # a per-token int32 array alone would be 1.2 GB
    assert elapsed < 10, elapsed
    # sample boundaries agree with a direct computation on the document stream
    ends = np.cumsum(ds.sequence_lengths[np.asarray(g.document_index)].astype(np.int64))
    for j in (0, 1, samples // 2, samples):
        doc, off = (int(x) for x in g.sample_index[j])
        assert ends[doc] - ds.sequence_lengths[g.document_index[doc]] + off == j * seq
    assert g[0]["tokens"].shape == (seq + 1,)
