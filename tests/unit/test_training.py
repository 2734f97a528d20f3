"""Training pieces in-process: LR schedule, optimizer groups, DeepSpeed config, one real step."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from megatron_qsparse.arguments import parse
from megatron_qsparse.config import ConfigError
from megatron_qsparse.training.setup import LRScheduler, deepspeed_config, param_groups


def cfg_of(*argv, data="unused"):
    return parse(["--data-path", data, "--tokenizer-type", "ByteTokenizer", *argv])


def lrs(*argv, steps):
    cfg = cfg_of(*argv)
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    sched = LRScheduler(opt, cfg)
    out = []
    for _ in range(steps):
        out.append(sched.get_lr()[0])
        sched.step()
    return out


def test_warmup_then_cosine_to_min_lr():
    v = lrs("--lr", "1.0", "--min-lr", "0.1", "--lr-warmup-iters", "4", "--train-iters", "14",
            steps=16)
    assert v[:4] == pytest.approx([0.25, 0.5, 0.75, 1.0])
    assert v[4] == pytest.approx(1.0)
    assert v[9] == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 5 / 10)))
    assert v[14] == pytest.approx(0.1) and v[15] == pytest.approx(0.1)
    assert all(a >= b for a, b in zip(v[4:], v[5:]))


def test_linear_and_constant_decay():
    lin = lrs("--lr", "1.0", "--min-lr", "0.0", "--lr-decay-style", "linear", "--train-iters",
              "10", steps=11)
    assert lin[:3] == pytest.approx([1.0, 0.9, 0.8]) and lin[10] == pytest.approx(0.0)
    const = lrs("--lr", "0.5", "--lr-decay-style", "constant", "--train-iters", "10", steps=10)
    assert const == pytest.approx([0.5] * 10)


def test_scheduler_state_round_trip():
    cfg = cfg_of("--lr", "1.0", "--lr-warmup-iters", "3", "--train-iters", "10")
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    a = LRScheduler(opt, cfg)
    for _ in range(5):
        a.step()
    b = LRScheduler(opt, cfg)
    b.load_state_dict(json.loads(json.dumps(a.state_dict())))
    assert b.get_lr() == a.get_lr()


def test_no_weight_decay_on_norms_and_biases():
    model = torch.nn.Sequential(torch.nn.Linear(4, 4, bias=True), torch.nn.LayerNorm(4))
    decay, no_decay = param_groups(model, 0.1)
    assert decay["weight_decay"] == 0.1 and len(decay["params"]) == 1
    assert no_decay["weight_decay"] == 0.0 and len(no_decay["params"]) == 3


def test_deepspeed_config_from_flags():
    cfg = cfg_of("--micro-batch-size", "2", "--global-batch-size", "16", "--zero-stage", "2",
                 "--clip-grad", "0.5", "--bf16")
    ds = deepspeed_config(cfg, world_size=2)
    assert ds["train_micro_batch_size_per_gpu"] == 2
    assert ds["gradient_accumulation_steps"] == 4
    assert ds["zero_optimization"]["stage"] == 2 and ds["gradient_clipping"] == 0.5
    assert ds["bf16"]["enabled"] is True


def test_deepspeed_config_file_merge(tmp_path, caplog):
    path = tmp_path / "ds.json"
    path.write_text(json.dumps({"zero_optimization": {"stage": 3, "overlap_comm": True},
                                "train_batch_size": 999, "gradient_clipping": 2.0}))
    cfg = cfg_of("--deepspeed-config", str(path), "--zero-stage", "1")
    with caplog.at_level("WARNING"):
        ds = deepspeed_config(cfg, world_size=1)
    assert ds["zero_optimization"] == {"stage": 1, "overlap_comm": True}  # ours win, theirs kept
    assert "train_batch_size" not in ds
    assert "zero_optimization.stage=3 replaced" in caplog.text
    assert "gradient_clipping=2.0 replaced" in caplog.text


def test_deepspeed_config_rejects_optimizer_section(tmp_path):
    path = tmp_path / "ds.json"
    path.write_text(json.dumps({"optimizer": {"type": "Adam"}}))
    with pytest.raises(ConfigError, match="remove its 'optimizer'"):
        deepspeed_config(cfg_of("--deepspeed-config", str(path)), world_size=1)
    path.write_text("{not json")
    with pytest.raises(ConfigError, match="is not valid JSON"):
        deepspeed_config(cfg_of("--deepspeed-config", str(path)), world_size=1)


@pytest.fixture(scope="module")
def byte_dataset(tmp_path_factory):
    from megatron_qsparse.data.indexed_dataset import IndexedDatasetBuilder

    prefix = str(tmp_path_factory.mktemp("bytes") / "tiny_text_document")
    builder = IndexedDatasetBuilder(prefix, np.uint16)
    rng = np.random.RandomState(0)
    for _ in range(64):
        builder.add_document(rng.randint(0, 256, size=rng.randint(20, 80)).tolist() + [256])
    builder.finalize()
    return prefix


def test_one_training_step_changes_every_weight(byte_dataset, tmp_path):
    from megatron_qsparse.training.loop import train
    from megatron_qsparse.training.setup import setup

    cfg = cfg_of("--num-layers", "2", "--hidden-size", "32", "--num-attention-heads", "2",
                 "--seq-length", "16", "--micro-batch-size", "2", "--train-iters", "1",
                 "--eval-iters", "1", "--split", "90,10,0", "--lr", "1e-2",
                 "--qsparse-ratio", "0.5", "--data-cache-path", str(tmp_path / "cache"),
                 data=byte_dataset)
    state = setup(cfg)
    before = {n: p.detach().clone() for n, p in state.model.named_parameters()}
    summary = train(state)
    assert summary["iterations"] == 1 and math.isfinite(summary["train_loss"])
    for name, p in state.model.named_parameters():
        assert not torch.equal(p.detach(), before[name]), f"{name} did not change"
