"""Packed sequences through the real CLI: pretraining with Megatron's document-reset flags and
packed SFT train under tensor x pipeline x data parallelism (and --torch-compile) with the losses,
gradient norms and validation loss of one eager process (fp32, the tolerances of
test_parallel_layouts.py: the position/segment ids travel with the batch and through the
pipeline stages, the attention mask is the same on every TP rank)."""

from __future__ import annotations

import json
import random

import pytest

from tests.e2e.test_parallel_layouts import COMMON, _assert_same, _result, launch, needs_launcher
from tests.e2e.test_pretrain_cli import pretrain
from tests.helpers import CORPUS, TOKENIZER, run_cli

pytestmark = pytest.mark.slow

RESETS = ["--reset-position-ids", "--reset-attention-mask", "--eod-mask-loss"]
PACKED = ["--data-format", "sft", "--sft-packing", "--seq-length", "64"]


def _sentences(limit: int) -> list[str]:
    out = []
    with open(CORPUS) as fh:
        for line in fh:
            out += [s.strip() + "." for s in json.loads(line)["text"].split(". ") if s.strip()]
            if len(out) >= limit:
                break
    return out[:limit]


@pytest.fixture(scope="module")
def short_docs(tmp_path_factory) -> str:
    """Pretraining documents of 1-3 sentences (~10-60 tokens): several per 32-token sample."""
    d = tmp_path_factory.mktemp("short_docs")
    rng = random.Random(0)
    sentences = _sentences(3000)
    with open(d / "docs.jsonl", "w") as fh:
        while sentences:
            k = rng.randint(1, 3)
            fh.write(json.dumps({"text": " ".join(sentences[:k])}) + "\n")
            sentences = sentences[k:]
    run_cli(["tools/preprocess_data.py", "--input", str(d / "docs.jsonl"), "--output-prefix",
             str(d / "docs"), "--tokenizer-type", "SentencePieceTokenizer", "--tokenizer-model",
             str(TOKENIZER), "--append-eod", "--workers", "1"])
    return str(d / "docs_text_document")


@pytest.fixture(scope="module")
def instructions(tmp_path_factory) -> str:
    """Instruction samples whose responses are 1-4 sentences."""
    d = tmp_path_factory.mktemp("instructions")
    rng = random.Random(1)
    sentences = _sentences(1500)
    with open(d / "sft.jsonl", "w") as fh:
        while sentences:
            k = rng.randint(1, 4)
            words = sentences[0].split()
            fh.write(json.dumps({"question": f"Continue: {' '.join(words[:rng.randint(2, 6)])}",
                                 "response": " ".join(sentences[:k])}) + "\n")
            sentences = sentences[k:]
    run_cli(["tools/preprocess_sft.py", "--input", str(d / "sft.jsonl"), "--output-prefix",
             str(d / "orca"), "--tokenizer-type", "SentencePieceTokenizer", "--tokenizer-model",
             str(TOKENIZER)])
    return str(d / "orca_sft")


def _run(data: str, out, *flags: str, layout=None) -> dict:
    logs = ["--tensorboard-dir", str(out / "tb"), "--summary-json", str(out / "summary.json")]
    if layout is None:
        proc = pretrain(data, *COMMON, *flags, *logs)
        text = proc.stdout + proc.stderr
    else:
        tp, pp, dp = layout
        text = launch(tp * pp * dp, data, "--tensor-model-parallel-size", str(tp),
                      "--pipeline-model-parallel-size", str(pp), "--zero-stage", "1", *flags,
                      *logs)
    return {**_result(out), "log": text}


@needs_launcher
def test_reset_flags_under_tensor_and_pipeline_parallelism(short_docs, tmp_path):
    ref = _run(short_docs, tmp_path / "ref", *RESETS)
    assert "documents end at token 2 (" + " ".join(RESETS) + ")" in ref["log"], ref["log"][-3000:]
    _assert_same(_run(short_docs, tmp_path / "tp2pp2", *RESETS, layout=(2, 2, 1)), ref)


@needs_launcher
def test_packed_sft_under_pipeline_data_parallelism_and_compile(instructions, tmp_path):
    ref = _run(instructions, tmp_path / "ref", *PACKED)
    assert "packed into" in ref["log"], ref["log"][-3000:]
    _assert_same(_run(instructions, tmp_path / "pp2dp2", *PACKED, layout=(1, 2, 2)), ref)
    _assert_same(_run(instructions, tmp_path / "compiled", *PACKED, "--torch-compile"), ref)
