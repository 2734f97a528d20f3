"""Training pieces in-process: LR schedule, optimizer groups, DeepSpeed config, one real step."""

from __future__ import annotations

import json
import math
import os

import numpy as np
import pytest
import torch

from megatron_qsparse.arguments import parse
from megatron_qsparse.config import ConfigError
from megatron_qsparse.training.deepspeed_config import deepspeed_config
from megatron_qsparse.training.optim import GuardedAdamW, LRScheduler, param_groups


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


@pytest.mark.parametrize("style,coeff", [
    ("linear", lambda r: 1 - r), ("cosine", lambda r: 0.5 * (math.cos(math.pi * r) + 1)),
    ("exponential", lambda r: 2 * 0.5 ** r - 1), ("minus_sqrt", lambda r: 1 - math.sqrt(r))])
def test_wsd_warmup_stable_decay(style, coeff):
    v = lrs("--lr", "1.0", "--min-lr", "0.1", "--lr-decay-style", "WSD", "--lr-warmup-iters", "2",
            "--lr-wsd-decay-iters", "4", "--lr-wsd-decay-style", style, "--train-iters", "10",
            steps=12)
    assert v[:2] == pytest.approx([0.5, 1.0])
    assert v[2:7] == pytest.approx([1.0] * 5)  # stable until the last 4 iterations
    for step in (7, 8, 9):
        assert v[step] == pytest.approx(0.1 + 0.9 * coeff((step - 6) / 4))
    assert v[10] == pytest.approx(0.1) and v[11] == pytest.approx(0.1)


def test_scheduler_holds_on_a_skipped_step():
    cfg = cfg_of("--lr", "1.0", "--lr-decay-style", "linear", "--train-iters", "10")
    opt = GuardedAdamW([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    sched = LRScheduler(opt, cfg)
    opt.overflow = True
    sched.step()
    assert sched.num_steps == 0 and sched.get_lr() == [1.0]
    opt.overflow = False
    sched.step()
    assert sched.num_steps == 1 and sched.get_lr() == [pytest.approx(0.9)]


def test_guarded_adamw_skips_non_finite_gradients():
    p = torch.nn.Parameter(torch.ones(3))
    opt = GuardedAdamW([p], lr=0.1, weight_decay=0.1)
    p.grad = torch.tensor([1.0, float("nan"), 0.0])
    opt.step()
    assert torch.equal(p.detach(), torch.ones(3)) and opt.overflow and opt.skipped_iters == 1
    assert not opt.state  # no moments were touched
    p.grad = torch.tensor([1.0, float("inf"), 0.0])
    opt.step()
    assert opt.consecutive_skips == 2
    p.grad = torch.tensor([1.0, 1.0, 1.0])
    opt.step()
    assert not opt.overflow and opt.consecutive_skips == 0 and opt.skipped_iters == 2
    assert (p.detach() < 1).all()


def test_guarded_adamw_measures_and_clips_like_torch():
    """fp32 ZeRO-0: the optimizer measures the full-model norm and clips as
    torch.nn.utils.clip_grad_norm_ does (DeepSpeed's clipping is off then)."""
    from megatron_qsparse.parallel.state import ParallelState

    torch.manual_seed(0)
    a = [torch.nn.Parameter(torch.randn(4, 3)), torch.nn.Parameter(torch.randn(5))]
    b = [torch.nn.Parameter(t.detach().clone()) for t in a]
    grads = [torch.randn(4, 3) * 3, torch.randn(5) * 3]
    for p, g in zip(a, grads):
        p.grad = g.clone()
    for p, g in zip(b, grads):
        p.grad = g.clone()
    mine = GuardedAdamW(a, lr=0.1, clip_grad=1.0, parallel=ParallelState.single())
    seen = []
    mine.on_step = lambda opt: seen.append(float(torch.linalg.vector_norm(
        torch.cat([p.grad.flatten() for p in a]))))
    mine.step()
    ref = torch.optim.AdamW(b, lr=0.1)
    norm = torch.nn.utils.clip_grad_norm_(b, 1.0)
    ref.step()
    assert mine.grad_norm == pytest.approx(float(norm), rel=1e-6)
    assert seen and seen[0] == pytest.approx(float(norm), rel=1e-6)  # hook sees unclipped grads
    for p, q in zip(a, b):
        torch.testing.assert_close(p.detach(), q.detach(), rtol=1e-6, atol=1e-7)
    assert deepspeed_config(cfg_of("--clip-grad", "0.7"), 1)["gradient_clipping"] == 0.0
    assert deepspeed_config(cfg_of("--clip-grad", "0.7", "--zero-stage", "1"),
                            1)["gradient_clipping"] == 0.7


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


def test_deepspeed_buckets_capped_by_model_size(tmp_path):
    cfg = cfg_of("--zero-stage", "1")
    assert deepspeed_config(cfg, 1)["zero_optimization"] == {"stage": 1}
    zero = deepspeed_config(cfg, 1, local_parameters=3_000_000)["zero_optimization"]
    assert zero["reduce_bucket_size"] == zero["allgather_bucket_size"] == 3_000_000
    assert deepspeed_config(cfg, 1, 10**10)["zero_optimization"]["reduce_bucket_size"] == 5e8
    path = tmp_path / "ds.json"
    path.write_text(json.dumps({"zero_optimization": {"reduce_bucket_size": 123}}))
    zero = deepspeed_config(cfg_of("--zero-stage", "2", "--deepspeed-config", str(path)), 1,
                            3_000_000)["zero_optimization"]
    assert zero["reduce_bucket_size"] == 123 and zero["allgather_bucket_size"] == 3_000_000


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
    from megatron_qsparse.training.setup import setup
    from megatron_qsparse.training.trainer import Trainer

    cfg = cfg_of("--num-layers", "2", "--hidden-size", "32", "--num-attention-heads", "2",
                 "--seq-length", "16", "--micro-batch-size", "2", "--train-iters", "1",
                 "--eval-iters", "1", "--split", "90,10,0", "--lr", "1e-2",
                 "--qsparse-ratio", "0.5", "--data-cache-path", str(tmp_path / "cache"),
                 data=byte_dataset)
    state = setup(cfg)
    before = {n: p.detach().clone() for n, p in state.model.named_parameters()}
    summary = Trainer(state).train()
    assert summary["iterations"] == 1 and math.isfinite(summary["train_loss"])
    for name, p in state.model.named_parameters():
        assert not torch.equal(p.detach(), before[name]), f"{name} did not change"


def _tiny_cfg(byte_dataset, tmp_path, *argv):
    return cfg_of("--num-layers", "2", "--hidden-size", "32", "--num-attention-heads", "2",
                  "--seq-length", "16", "--micro-batch-size", "2", "--eval-iters", "0",
                  "--split", "90,10,0", "--lr", "1e-2", "--qsparse-ratio", "0.5",
                  "--data-cache-path", str(tmp_path / "cache"), *argv, data=byte_dataset)


def _nan_on_calls(model, calls):
    """Make the embedding output NaN on the given (1-based) forward calls."""
    count = {"n": 0}

    def hook(module, args, out):
        count["n"] += 1
        return out * float("nan") if count["n"] in calls else out

    return model.embedding.register_forward_hook(hook)


def test_nan_batch_is_skipped_and_counted(byte_dataset, tmp_path):
    from megatron_qsparse.training.setup import setup
    from megatron_qsparse.training.trainer import Trainer

    state = setup(_tiny_cfg(byte_dataset, tmp_path, "--train-iters", "6", "--log-interval", "1"))
    _nan_on_calls(state.model, {3})
    summary = Trainer(state).train()
    assert summary["iterations"] == 6 and summary["skipped_iterations"] == 1
    assert state.scheduler.num_steps == 5  # the schedule held on the skipped step
    assert math.isfinite(summary["train_loss"])
    assert all(torch.isfinite(p).all() for p in state.model.parameters())


def test_consecutive_non_finite_steps_stop_the_run(byte_dataset, tmp_path):
    from megatron_qsparse.training.setup import setup
    from megatron_qsparse.training.trainer import Trainer, TrainingStopped

    state = setup(_tiny_cfg(byte_dataset, tmp_path, "--train-iters", "20",
                            "--max-consecutive-skipped-iters", "3"))
    _nan_on_calls(state.model, set(range(2, 100)))
    with pytest.raises(TrainingStopped, match="3 consecutive iterations had non-finite"):
        Trainer(state).train()
    assert state.iteration == 4


def test_crash_while_saving_keeps_the_previous_checkpoint(byte_dataset, tmp_path, monkeypatch):
    from megatron_qsparse.training import checkpointing
    from megatron_qsparse.training.setup import setup
    from megatron_qsparse.training.trainer import Trainer

    ckpt = tmp_path / "ckpt"
    state = setup(_tiny_cfg(byte_dataset, tmp_path, "--train-iters", "4", "--save", str(ckpt),
                            "--save-interval", "2"))
    good = {}
    real_save, real_replace = checkpointing.save, checkpointing.os.replace

    def snapshot_save(engine, cfg, iteration, *args, **kwargs):
        if iteration == 2:
            good.update({n: p.detach().clone() for n, p in state.model.named_parameters()})
        return real_save(engine, cfg, iteration, *args, **kwargs)

    def dying_replace(src, dst):
        # the save at iteration 4 dies right before its folder would be renamed into place
        if os.path.basename(str(src)) == ".tmp-iter_0000004":
            raise KeyboardInterrupt("simulated crash")
        return real_replace(src, dst)

    monkeypatch.setattr(checkpointing, "save", snapshot_save)
    monkeypatch.setattr(checkpointing.os, "replace", dying_replace)
    with pytest.raises(KeyboardInterrupt):
        Trainer(state).train()
    monkeypatch.undo()
    assert good and (ckpt / "latest").read_text() == "iter_0000002"
    assert not (ckpt / "iter_0000004").exists()

    fresh = setup(_tiny_cfg(byte_dataset, tmp_path, "--train-iters", "4", "--load", str(ckpt),
                            "--seed", "99"))
    it, consumed = checkpointing.load(fresh.engine, fresh.cfg, fresh.dp_size)
    assert (it, consumed) == (2, 4)
    for name, p in fresh.model.named_parameters():
        assert torch.equal(p.detach(), good[name]), name


def test_loss_spike_detector():
    from megatron_qsparse.training.loop import SpikeDetector

    det = SpikeDetector(factor=2.0, warmup=3)
    flags = [det(v) for v in (4.0, 4.0, 4.0, 9.0, 4.1, 12.0, 4.0)]
    assert flags == [False, False, False, True, False, True, False]
    assert det.count == 2 and 3.9 < det.ema < 4.2  # spikes do not pull the average up
    off = SpikeDetector(factor=0.0)
    assert not any(off(v) for v in (1.0, 1.0, 100.0) * 10)
