"""tools/generate.py on a checkpoint the real CLI trained."""

from __future__ import annotations

import pytest

from tests.e2e.test_pretrain_cli import pretrain
from tests.helpers import run_cli

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def checkpoint(kjv_small, tmp_path_factory):
    from megatron_qsparse.inference import cpu_kernels

    cpu_kernels.available()  # build the decode kernel once here, not inside each CLI run
    ckpt = tmp_path_factory.mktemp("generate") / "ckpt"
    pretrain(kjv_small, "--train-iters", "6", "--eval-iters", "0", "--save", str(ckpt),
             "--qsparse-ratio", "0.6", "--qsparse-down-ratio", "0.7")
    return ckpt


def test_generate_greedy_kernel_on_and_off_agree(checkpoint):
    args = ["tools/generate.py", "--load", str(checkpoint), "--prompt", "In the beginning God",
            "--max-new-tokens", "12", "--greedy", "--ignore-eod"]
    on = run_cli(args)
    layers = run_cli(args + ["--compiled-step", "off", "--profile"])
    off = run_cli(args + ["--sparse-kernel", "off"])
    prof = run_cli(args + ["--profile"])
    assert prof.stdout == on.stdout
    assert "--- profile, ms per decode step:" in prof.stderr and "products" in prof.stderr
    assert "no compiled decode step ran" in layers.stderr
    assert on.stdout.startswith("In the beginning God")
    assert len(on.stdout.strip()) > len("In the beginning God")
    # same greedy tokens: compiled step, per-projection sparse GEMV, training forward
    assert on.stdout == layers.stdout == off.stdout
    assert "12 tokens" in on.stderr and "decode" in on.stderr and "tokens/s" in on.stderr
    assert "8 compiled-step" in on.stderr and "topk S=0.6" in on.stderr
    assert "8 fused-topk" in layers.stderr
    assert "8 reference" in off.stderr


@pytest.mark.parametrize("dtype", ["float16", "int8"])
def test_generate_with_16_bit_and_int8_decode_weights(checkpoint, dtype):
    """--decode-weight-dtype: the compiled step and the layers give the same greedy text."""
    args = ["tools/generate.py", "--load", str(checkpoint), "--prompt", "In the beginning God",
            "--max-new-tokens", "8", "--greedy", "--ignore-eod", "--decode-weight-dtype", dtype]
    on = run_cli(args)
    layers = run_cli(args + ["--compiled-step", "off"])
    assert on.stdout == layers.stdout and on.stdout.startswith("In the beginning God")
    assert f"decode weights {dtype}" in on.stderr and "8 compiled-step" in on.stderr


def test_generate_sampling_is_seeded(checkpoint):
    args = ["tools/generate.py", "--load", str(checkpoint), "--prompt", "And", "--max-new-tokens",
            "8", "--temperature", "0.8", "--top-p", "0.9", "--seed", "3", "--ignore-eod"]
    assert run_cli(args).stdout == run_cli(args).stdout


def test_generate_errors_are_one_line(checkpoint, tmp_path):
    proc = run_cli(["tools/generate.py", "--load", str(tmp_path)], check=False)
    assert proc.returncode == 2
    assert "neither a checkpoint folder" in proc.stderr.strip().splitlines()[-1]
    proc = run_cli(["tools/generate.py", "--load", str(checkpoint), "--max-new-tokens", "500"],
                   check=False)
    assert proc.returncode == 2
    assert "exceed the model's 32" in proc.stderr.strip().splitlines()[-1]
    proc = run_cli(["tools/generate.py", "--load", str(checkpoint), "--tokenizer-model",
                    str(tmp_path / "nope.model")], check=False)
    assert proc.returncode == 2 and "nope.model" in proc.stderr.strip().splitlines()[-1]
