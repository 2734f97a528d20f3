"""Supervised fine-tuning data: records, template, loss mask, padding, labels and loss averaging."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from megatron_qsparse.config import Config, ConfigError, validate
from megatron_qsparse.data.indexed_dataset import IndexedDataset
from megatron_qsparse.data.sampler import collate_tokens
from megatron_qsparse.data.sft_dataset import (MASK_SUFFIX, SFTDataset, build_sft_datasets,
                                               encode, record_fields, render)
from megatron_qsparse.data.tokenizer import ByteTokenizer
from megatron_qsparse.data.validation import validate_data
from megatron_qsparse.training.loop import get_batch, mean_loss
from tests.helpers import run_cli

RECORDS = [
    {"system_prompt": "Be brief.", "question": "Capital of France?", "response": "Paris."},
    {"input": "2+2", "output": "4"},
    {"instruction": "Translate", "input": "chat", "output": "cat"},
    {"system_prompt": "", "question": "Why?", "response": "Because the sky scatters blue."},
]


def test_record_formats():
    assert record_fields(RECORDS[0]) == ("Be brief.", "Capital of France?", "Paris.")
    assert record_fields(RECORDS[1]) == ("", "2+2", "4")
    assert record_fields(RECORDS[2]) == ("", "Translate\n\nchat", "cat")
    for bad in ({"question": "q"}, {"input": "x", "output": ""}, [1], {"text": "t"}):
        with pytest.raises(ValueError):
            record_fields(bad)


def test_template_and_mask_cover_exactly_the_response():
    tok = ByteTokenizer()
    prompt, completion = render("alpaca", "Be brief.", "Capital of France?", "Paris.")
    assert prompt == "Be brief.\n\n### Instruction:\nCapital of France?\n\n### Response:\n"
    assert completion == "Paris."
    tokens, mask = encode(tok, prompt, completion)
    assert len(tokens) == len(mask)
    assert tokens[0] == tok.bos and tokens[-1] == tok.eod
    trained = [t for t, m in zip(tokens, mask) if m]
    assert trained == tok.tokenize("Paris.") + [tok.eod]
    assert mask == [0] * (1 + len(tok.tokenize(prompt))) + [1] * (len("Paris.") + 1)
    p2, c2 = render("chatml", "", "hi", "yo")
    assert p2 == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n" and c2 == "yo<|im_end|>"


@pytest.fixture(scope="module")
def sft_prefix(tmp_path_factory):
    d = tmp_path_factory.mktemp("sft")
    lines = [json.dumps(r) for r in RECORDS] + ["{not json", json.dumps({"question": "only"})]
    (d / "data.jsonl").write_text("\n".join(lines) + "\n")
    proc = run_cli(["tools/preprocess_sft.py", "--input", str(d / "data.jsonl"),
                    "--output-prefix", str(d / "oo"), "--tokenizer-type", "ByteTokenizer"])
    assert "4 samples" in proc.stdout and "skipped 2 bad" in proc.stdout
    assert "data.jsonl:5:" in proc.stderr and "data.jsonl:6:" in proc.stderr
    return str(d / "oo_sft")


def test_dataset_pads_truncates_and_labels(sft_prefix):
    tok = ByteTokenizer()
    toks, mask = IndexedDataset(sft_prefix), IndexedDataset(sft_prefix + MASK_SUFFIX)
    assert len(toks) == len(mask) == 4
    for i, rec in enumerate(RECORDS):
        t, m = toks.get(i), mask.get(i)
        assert len(t) == len(m)
        _, _, response = record_fields(rec)
        assert tok.detokenize(t[m == 1]) == response  # the eod is not a byte: dropped
        assert t[m == 1][-1] == tok.eod and m.sum() == len(response.encode()) + 1

    seq = 48
    ds = SFTDataset(toks, mask, np.arange(4), 8, seq, seed=1, pad_id=tok.pad)
    assert ds.truncated == sum(len(toks.get(i)) > seq + 1 for i in range(4)) > 0
    seen = set()
    for i in range(8):
        s = ds[i]
        assert s["tokens"].shape == s["loss_mask"].shape == (seq + 1,)
        seen.add(s["tokens"][:20].tobytes())
    assert len(seen) == 4  # two epochs visit every sample
    # a short sample is padded after its end with mask 0
    short = next(ds[i] for i in range(4) if (ds[i]["tokens"] == tok.pad).any())
    assert not short["loss_mask"][short["tokens"] == tok.pad].any()

    batch = collate_tokens([ds[i] for i in range(4)])
    inputs, labels = get_batch(batch)
    assert inputs.shape == labels.shape == (4, seq)
    trained = labels != -100
    assert torch.equal(trained, batch["loss_mask"][:, 1:].bool())
    assert torch.equal(labels[trained], batch["tokens"][:, 1:][trained])


def test_mean_loss_averages_trained_tokens_only():
    per_token = torch.tensor([[1.0, 0.0, 3.0], [0.0, 0.0, 0.0]])
    labels = torch.tensor([[5, -100, 7], [-100, -100, -100]])
    assert mean_loss(per_token, labels).item() == pytest.approx(2.0)
    assert mean_loss(torch.ones(2, 3), torch.zeros(2, 3, dtype=torch.long)).item() == 1.0


def test_builder_splits_and_validation(sft_prefix, tmp_path):
    train, valid, test = build_sft_datasets([sft_prefix], "50,50,0", 32, 0, (6, 2, 0), 258)
    assert len(train) == 6 and len(valid) == 2 and test is None
    assert set(train.docs.tolist()) == {0, 1} and set(valid.docs.tolist()) == {2, 3}
    cfg = Config()
    cfg.data.tokenizer_type = "ByteTokenizer"
    cfg.data.data_format = "sft"
    cfg.data.data_path = [sft_prefix]
    validate_data(validate(cfg).data)
    cfg.data.data_path = [str(tmp_path / "oo_text_document")]
    with pytest.raises(ConfigError, match="^--data-format: .*preprocess_sft.py"):
        validate_data(validate(cfg).data)
