"""Tiny checkpoints for the evaluation tests, written in the layout training saves
(``latest``, ``iter_*/qsparse_meta.json``, ``mp_rank_XX_model_states.pt`` with ``module``),
from a randomly initialised model: fast, and any TP layout."""

from __future__ import annotations

import json
import os

import torch

from megatron_qsparse.config import Config, padded_vocab_size
from megatron_qsparse.model.gpt import GPTModel
from megatron_qsparse.model.sharding import shard_state_dict
from tests.helpers import TOKENIZER


def tiny_config(tp: int = 1, ratio: float = 0.5, seq_length: int = 32) -> Config:
    cfg = Config()
    m = cfg.model
    m.num_layers, m.hidden_size, m.num_attention_heads, m.num_query_groups = 2, 64, 4, 2
    m.seq_length, m.vocab_size = seq_length, 4096
    m.init_method_std = 0.3  # well separated logits: greedy choices are not near-ties
    cfg.qsparse.mode, cfg.qsparse.ratio = "topk", ratio
    cfg.data.tokenizer_type, cfg.data.tokenizer_model = "SentencePieceTokenizer", str(TOKENIZER)
    cfg.data.data_path = ["unused"]
    cfg.parallel.tensor_model_parallel_size = tp
    return cfg


def write_checkpoint(save_dir: str, cfg: Config, seed: int = 0) -> dict:
    """Write a checkpoint of a seeded random model split ``cfg``'s TP ways; returns the full
    (TP = 1) state dict."""
    torch.manual_seed(seed)
    tp = cfg.parallel.tensor_model_parallel_size
    model = GPTModel(cfg.model, padded_vocab_size(cfg.model.vocab_size, cfg))
    full = {k: v.detach().clone() for k, v in model.state_dict().items()}
    folder = os.path.join(save_dir, "iter_0000010")
    os.makedirs(folder, exist_ok=True)
    for r in range(tp):
        sd = full if tp == 1 else shard_state_dict(full, r, tp, cfg.model)
        torch.save({"module": sd, "iteration": 10},
                   os.path.join(folder, f"mp_rank_{r:02d}_model_states.pt"))
    meta = {"iteration": 10, "consumed_samples": 40, "tensor_model_parallel_size": tp,
            "pipeline_model_parallel_size": 1, "data_parallel_size": 1, "zero_stage": 0,
            "config": cfg.to_dict()}
    with open(os.path.join(folder, "qsparse_meta.json"), "w") as fh:
        json.dump(meta, fh)
    with open(os.path.join(save_dir, "latest"), "w") as fh:
        fh.write("iter_0000010")
    return full
