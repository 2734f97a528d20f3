"""A Hugging Face model imported with tools/checkpoint_convert.py fine-tunes with
`pretrain_qsparse.py --load CKPT --finetune --data-format sft` (Q-Sparse on, with the sparsity
warm-up), and a few SFT steps lower the loss on the response tokens."""

from __future__ import annotations

import json
import random

import pytest
import torch

from megatron_qsparse.checkpoint import load_model
from megatron_qsparse.data.indexed_dataset import IndexedDataset
from megatron_qsparse.data.sft_dataset import MASK_SUFFIX
from tests.helpers import run_cli

pytestmark = pytest.mark.slow


def _response_loss(ckpt: str, prefix: str, n: int = 16) -> float:
    """Mean loss over the response tokens of the first ``n`` samples (the model's own sparsity)."""
    model, _ = load_model(ckpt)
    toks, mask = IndexedDataset(prefix), IndexedDataset(prefix + MASK_SUFFIX)
    total, count = 0.0, 0
    with torch.no_grad():
        for i in range(n):
            t = torch.from_numpy(toks.get(i).astype("int64"))[None, :65]
            m = torch.from_numpy(mask.get(i).astype("int64"))[None, :65]
            labels = t[:, 1:].masked_fill(m[:, 1:] == 0, -100)
            loss = model(t[:, :-1], labels)
            total += loss.sum().item()
            count += int((labels != -100).sum())
    return total / count


def test_import_then_sft_lowers_response_loss(tmp_path):
    from tests.hf_models import converter

    import transformers

    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=260, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128))
    model.save_pretrained(str(tmp_path / "hf"))
    rng = random.Random(0)
    with open(tmp_path / "sft.jsonl", "w") as fh:
        for i in range(48):
            w = "".join(rng.choice("abcdefgh") for _ in range(rng.randint(3, 8)))
            rec = ({"question": f"Reverse {w}", "response": w[::-1]} if i % 2 else
                   {"input": f"Upper {w}", "output": w.upper()})
            fh.write(json.dumps(rec) + "\n")
    run_cli(["tools/preprocess_sft.py", "--input", str(tmp_path / "sft.jsonl"),
             "--output-prefix", str(tmp_path / "oo"), "--tokenizer-type", "ByteTokenizer"])
    prefix = str(tmp_path / "oo_sft")
    ckpt = str(tmp_path / "ck")
    assert converter().main(["import-hf", "--hf-dir", str(tmp_path / "hf"), "--save", ckpt,
                             "--qsparse-mode", "topk", "--qsparse-ratio", "0.4"]) == 0
    before = _response_loss(ckpt, prefix)

    run_cli(["pretrain_qsparse.py", "--config", f"{ckpt}/model_args.yaml", "--load", ckpt,
             "--finetune", "--data-format", "sft", "--data-path", prefix,
             "--tokenizer-type", "ByteTokenizer", "--seq-length", "64",
             "--micro-batch-size", "8", "--train-iters", "12", "--lr", "3e-3",
             "--qsparse-mode", "topk", "--qsparse-ratio", "0.4", "--qsparse-warmup-iters", "4",
             "--weight-decay", "0.01", "--split", "100,0,0", "--eval-iters", "0",
             "--log-interval", "4", "--save", str(tmp_path / "out"),
             "--summary-json", str(tmp_path / "summary.json")])
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["iterations"] == 12
    after = _response_loss(str(tmp_path / "out"), prefix)
    assert after < before - 0.5, (before, after)
