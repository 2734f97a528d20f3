"""Shared fixtures: small preprocessed datasets."""

from __future__ import annotations

import os

import pytest
import torch

# Triton's interpreter for the Triton kernel tests on machines without CUDA: the variable must be
# set before Triton is first imported, and torch.compile (earlier tests) imports it. See
# tests/unit/test_triton_kernels.py.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from tests.helpers import CORPUS, TOKENIZER, run_cli


@pytest.fixture(scope="session")
def kjv_small(tmp_path_factory) -> str:
    """The first 120 chapters of the sample corpus, preprocessed with the committed tokenizer.

    Returns the dataset prefix (``.../kjv_text_document``).
    """
    out = tmp_path_factory.mktemp("kjv_small")
    jsonl = out / "kjv_small.jsonl"
    with open(CORPUS) as src, open(jsonl, "w") as dst:
        for i, line in enumerate(src):
            if i >= 120:
                break
            dst.write(line)
    run_cli(["tools/preprocess_data.py", "--input", str(jsonl), "--output-prefix",
             str(out / "kjv"), "--tokenizer-type", "SentencePieceTokenizer", "--tokenizer-model",
             str(TOKENIZER), "--append-eod", "--workers", "1"])
    return str(out / "kjv_text_document")


@pytest.fixture(scope="session", autouse=True)
def _build_sparsify_kernels():
    """Build (or load) the compiled CPU kernels once, before any timed multi-process test.

    The first use compiles them (~30 s on a fresh machine); doing it here keeps that out of the
    per-test timeouts of the distributed and end-to-end tests, which then load the cached build.
    """
    from megatron_qsparse.sparsity import kernels

    kernels.available()


def pytest_generate_tests(metafunc):
    """A test taking the ``isa`` fixture runs once per instruction set the decode kernels can run
    with here, the CPU's own first: each path of the CPUs this suite may meet (an AVX2-only CPU's
    column-tile and row kernels on an AVX-512 one, the baseline loops everywhere)."""
    if "isa" in metafunc.fixturenames:
        from megatron_qsparse.inference import cpu_kernels

        metafunc.parametrize("isa", cpu_kernels.isas()[::-1] or ["unavailable"], indirect=True)


@pytest.fixture
def isa(request):
    """The decode kernels' instruction set for one test (``pytest_generate_tests``)."""
    from megatron_qsparse.inference import cpu_kernels

    if request.param == "unavailable":
        pytest.skip(f"decode kernel unavailable: {cpu_kernels.unavailable_reason()}")
    prev = cpu_kernels.set_isa(request.param)
    try:
        yield request.param
    finally:
        cpu_kernels.set_isa(prev)
