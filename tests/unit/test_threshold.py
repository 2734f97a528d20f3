"""Training-free magnitude thresholding (TEAL, ``--qsparse-mode threshold``): the mask, its
gradients, the quantile tables and their interpolation, calibration reaching its target sparsity,
config errors, and decoding a calibrated model."""

from __future__ import annotations

import json

import pytest
import torch

from megatron_qsparse.arguments import parse
from megatron_qsparse.config import Config, ConfigError, ModelConfig, QSparseConfig, validate
from megatron_qsparse.model.gpt import GPTModel
from megatron_qsparse.sparsity import (Sparsifier, collect_density, describe, method_names,
                                       reset_density, set_sparsity_scale)
from megatron_qsparse.sparsity.methods.threshold import calibrate, threshold_at

TABLE = [0.0] + [i / 100 for i in range(1, 101)]  # |x| ~ U(0, 1): the threshold at S is S


def tables(layers: int, table=TABLE) -> dict:
    return {"method": "threshold", "levels": 100, "tokens": 0,
            "thresholds": {f"layer{i}/{k}": list(table) for i in range(layers)
                           for k in ("qkv", "o", "gate_up", "down")}}


def qcfg(ratio=0.4, layers=2, **kw) -> QSparseConfig:
    return QSparseConfig(mode="threshold", ratio=ratio, calibration=tables(layers), **kw)


def test_registered_with_the_other_methods():
    assert set(method_names()) >= {"topk", "block", "relu", "none", "threshold"}
    assert describe(qcfg(0.6)) == "threshold S=0.6 (TEAL)"


def test_threshold_at_interpolates_and_is_zero_at_zero():
    t = [0.0, 1.0, 3.0]
    assert threshold_at(t, 0.0) == 0.0
    assert threshold_at(t, 0.25) == pytest.approx(0.5)
    assert threshold_at(t, 0.5) == pytest.approx(1.0)
    assert threshold_at(t, 0.75) == pytest.approx(2.0)
    assert threshold_at(t, 1.0) == pytest.approx(3.0)
    assert threshold_at(TABLE, 0.37) == pytest.approx(0.37)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_mask_is_abs_at_least_threshold(dtype):
    sp = Sparsifier(qcfg(0.3), "gate_up", 1)
    x = (torch.rand(5, 64, generator=torch.Generator().manual_seed(0)) * 2 - 1).to(dtype)
    x[0, :4] = torch.tensor([0.3, -0.3, 0.2999, -0.31], dtype=dtype)  # at / around the threshold
    y = sp(x)
    t = torch.tensor(0.3, dtype=dtype).item()  # the threshold as a Python float
    assert torch.equal(y, torch.where(x.abs() >= t, x, torch.zeros_like(x)))
    assert y.dtype == dtype


def test_ste_and_masked_gradients():
    x = torch.rand(4, 32, generator=torch.Generator().manual_seed(1)) * 2 - 1
    for ste in (True, False):
        xr = x.clone().requires_grad_()
        y = Sparsifier(qcfg(0.5, ste=ste), "qkv", 0)(xr)
        y.backward(torch.ones_like(y))
        want = torch.ones_like(x) if ste else (x.abs() >= 0.5).to(x.dtype)
        assert torch.equal(xr.grad, want)


def test_warmup_scale_and_per_projection_ratio():
    q = qcfg(0.6, down_ratio=0.2)
    sps = torch.nn.ModuleList([Sparsifier(q, "qkv", 0), Sparsifier(q, "down", 0)])
    x = torch.linspace(-1, 1, 2001).unsqueeze(0)
    assert (sps[0](x) != 0).float().mean().item() == pytest.approx(0.4, abs=2e-3)
    assert (sps[1](x) != 0).float().mean().item() == pytest.approx(0.8, abs=2e-3)
    set_sparsity_scale(sps, 0.0)
    assert torch.equal(sps[0](x), x)  # scale 0: threshold 0, nothing dropped
    set_sparsity_scale(sps, 0.5)
    assert (sps[0](x) != 0).float().mean().item() == pytest.approx(0.7, abs=2e-3)


def _model(layers=2, ffn="swiglu", q=None):
    cfg = ModelConfig(num_layers=layers, hidden_size=64, num_attention_heads=4,
                      num_query_groups=2, seq_length=32, ffn_hidden_size=128, ffn_type=ffn)
    torch.manual_seed(0)
    return GPTModel(cfg.with_sparsity(q or QSparseConfig(mode="none")), 256), cfg


@pytest.mark.parametrize("ffn", ["swiglu", "relu2_glu"])
def test_calibration_reaches_the_target_density(ffn):
    dense, cfg = _model(ffn=ffn)
    data = torch.randint(0, 256, (16, 32), generator=torch.Generator().manual_seed(3))
    cal = calibrate(dense, data.split(4), per_call=1 << 20)
    assert cal["tokens"] == data.numel() and len(cal["thresholds"]) == 8
    assert all(len(t) == 101 and t == sorted(t) for t in cal["thresholds"].values())
    for ratio in (0.4, 0.6):
        model = GPTModel(cfg.with_sparsity(QSparseConfig(mode="threshold", ratio=ratio, calibration=cal)), 256)
        model.load_state_dict(dense.state_dict())
        reset_density(model)
        with torch.no_grad():
            model(data)
        d = collect_density(model)
        for kind in ("qkv", "gate_up"):
            assert d[f"kind/{kind}"] == pytest.approx(1 - ratio, abs=0.03), (kind, d)
        # the tables come from the dense model; in the sparse one the attention output (o's
        # input) is computed from sparsified q/k/v and comes out smaller, so more of it drops
        assert 1 - ratio - 0.08 <= d["kind/o"] <= 1 - ratio + 0.02, d
        if ffn == "swiglu":
            assert 1 - ratio - 0.1 <= d["kind/down"] <= 1 - ratio + 0.02, d
        else:  # ReLU² leaves exact zeros: the threshold cannot keep more than the nonzeros
            assert d["kind/down"] <= 1 - ratio + 0.05


def test_calibration_leaves_the_model_as_it_was():
    model, _ = _model()
    before = [type(m.method) for m in model.modules() if isinstance(m, Sparsifier)]
    model.train()
    calibrate(model, [torch.randint(0, 256, (2, 32))])
    assert [type(m.method) for m in model.modules() if isinstance(m, Sparsifier)] == before
    assert model.training
    with pytest.raises(ValueError, match="no calibration tokens"):
        calibrate(model, [])


def _cfg(q: QSparseConfig, layers=2) -> Config:
    from megatron_qsparse.config import DataConfig

    return Config(model=ModelConfig(num_layers=layers), qsparse=q,
                  data=DataConfig(data_path=["unused"], tokenizer_type="ByteTokenizer"))


def test_config_errors():
    with pytest.raises(ConfigError, match="no calibrated thresholds; calibrate it with "
                                          "tools/calibrate_thresholds.py"):
        validate(_cfg(QSparseConfig(mode="threshold")))
    bad = tables(1)  # a 1-layer calibration for a 2-layer model
    with pytest.raises(ConfigError, match="layer1/qkv is missing"):
        validate(_cfg(QSparseConfig(mode="threshold", calibration=bad)))
    broken = tables(2, table=[0.0, 2.0, 1.0])
    with pytest.raises(ConfigError, match="non-decreasing"):
        validate(_cfg(QSparseConfig(mode="threshold", calibration=broken)))
    with pytest.raises(ConfigError, match="--qsparse-rescale: rescaling applies to top-K only"):
        validate(_cfg(qcfg(rescale="l2")))
    validate(_cfg(qcfg(0.5, o_ratio=0.2, warmup_iters=10)))  # ratios and warm-up apply


def test_cli_reads_the_calibration_file(tmp_path, capsys):
    path = tmp_path / "cal.json"
    path.write_text(json.dumps(tables(2)))
    base = ["--data-path", "unused", "--tokenizer-type", "ByteTokenizer", "--num-layers", "2",
            "--qsparse-mode", "threshold"]
    cfg = parse(base + ["--qsparse-calibration", str(path)])
    assert cfg.qsparse.calibration == tables(2)
    with pytest.raises(SystemExit) as e:
        parse(base)
    assert e.value.code == 2
    assert "no calibrated thresholds" in capsys.readouterr().err
    (tmp_path / "bad.json").write_text("[1, 2")
    with pytest.raises(SystemExit):
        parse(base + ["--qsparse-calibration", str(tmp_path / "bad.json")])
    assert "invalid JSON file value" in capsys.readouterr().err


def test_decoding_a_thresholded_model_matches_the_reference():
    from megatron_qsparse.inference import InferenceModel
    from megatron_qsparse.inference.generate import generate

    dense, cfg = _model()
    cal = calibrate(dense, [torch.randint(0, 256, (4, 32), generator=torch.Generator()
                                          .manual_seed(5))])
    q = QSparseConfig(mode="threshold", ratio=0.5, calibration=cal)

    def build():
        m = GPTModel(cfg.with_sparsity(q), 256)
        m.load_state_dict(dense.state_dict())
        return m

    from megatron_qsparse.inference import cpu_kernels

    fast, slow = InferenceModel(build()), InferenceModel(build(), sparse_kernel=False)
    layered = InferenceModel(build(), compiled_step=False)
    if cpu_kernels.available():  # thresholds run in the compiled step and layer by layer
        assert fast.step is not None
        assert layered.decode_paths() == {"sparsify+nonzero-gemv": 8}
    a = generate(fast, [3, 1, 4, 1, 5], 12, greedy=True)
    b = generate(slow, [3, 1, 4, 1, 5], 12, greedy=True)
    c = generate(layered, [3, 1, 4, 1, 5], 12, greedy=True)
    assert a.tokens == b.tokens == c.tokens
