#!/usr/bin/env python
"""Calibrate training-free magnitude thresholds (TEAL) for a checkpoint and save it sparsified.

Runs the checkpoint's model densely over --calibration-tokens tokens of a preprocessed dataset
(documents of one split of its --split, the training split by default, so a validation
perplexity afterwards is not measured on the calibration data), samples |x| at the input of every
projection, and stores each projection's quantile table in the config of a new checkpoint at
--save: the same weights, --qsparse-mode threshold at --qsparse-ratio S = --sparsity. Any other S
can be chosen later without recalibrating (tools/evaluate.py perplexity --qsparse-ratio 0.6, or
--qsparse-ratio when continue-training). See megatron_qsparse/sparsity/methods/threshold.py.

Works on any checkpoint of ours with tensor-parallel size 1 (any pipeline split), e.g. a Hugging
Face model imported with tools/checkpoint_convert.py import-hf: no training is needed.

Example:
  python tools/calibrate_thresholds.py --load ckpt/dense --data-path data/corpus_text_document \\
      --sparsity 0.4 --save ckpt/dense_teal
  python tools/evaluate.py perplexity --load ckpt/dense_teal --data-path data/corpus_text_document \\
      --split-name valid
"""

from __future__ import annotations

import argparse
import copy
import os
import sys

import torch

from megatron_qsparse.config import PROJECTION_KINDS, Config, ConfigError, DataConfig


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="\n".join(__doc__.splitlines()[2:]))
    p.add_argument("--load", required=True, help="Save directory (uses 'latest') or iter_* folder.")
    p.add_argument("--data-path", required=True, help="Preprocessed dataset prefix (.bin/.idx).")
    p.add_argument("--save", required=True, help="Save directory of the calibrated checkpoint "
                   "(must differ from --load's).")
    p.add_argument("--sparsity", type=float, default=0.4,
                   help="The sparsity ratio S the saved checkpoint runs at.")
    p.add_argument("--split-name", choices=("train", "valid", "test", "all"), default="train",
                   help="Which documents of the checkpoint's --split to calibrate on.")
    p.add_argument("--calibration-tokens", type=int, default=65536,
                   help="Tokens to run (whole windows of --seq-length).")
    p.add_argument("--seq-length", type=int, default=None,
                   help="Tokens per window; default: the checkpoint's --seq-length.")
    p.add_argument("--micro-batch-size", type=int, default=8, help="Windows per forward pass.")
    p.add_argument("--seed", type=int, default=0, help="Seed of the |x| subsampling.")
    return p


def _windows(prefix: str, split: str, split_name: str, seq: int, n_tokens: int):
    """``[n, seq]`` token windows from the documents of one split, in document order."""
    import numpy as np

    from megatron_qsparse.data.gpt_dataset import parse_split, split_document_ranges
    from megatron_qsparse.data.indexed_dataset import IndexedDataset

    if not IndexedDataset.exists(prefix):
        raise ConfigError(f"--data-path: {prefix}.bin/.idx not found; give the prefix "
                          "tools/preprocess_data.py wrote")
    ds = IndexedDataset(prefix)
    n_docs = len(ds.document_indices) - 1
    lo, hi = 0, n_docs
    if split_name != "all":
        try:
            bounds = split_document_ranges(parse_split(split), n_docs)
        except ValueError as e:
            raise ConfigError(f"--split: {e}") from None
        k = ("train", "valid", "test").index(split_name)
        lo, hi = bounds[k], bounds[k + 1]
    want = max(1, n_tokens // seq) * seq
    parts, have = [], 0
    for d in range(lo, hi):
        for s in range(ds.document_indices[d], ds.document_indices[d + 1]):
            parts.append(np.asarray(ds[s], dtype=np.int64))
            have += len(parts[-1])
        if have >= want:
            break
    have = (min(have, want) // seq) * seq
    if have == 0:
        raise ConfigError(f"--data-path: the {split_name} documents of {prefix} hold fewer than "
                          f"--seq-length {seq} tokens; use --split-name all or more data")
    tokens = np.concatenate(parts)[:have]
    return torch.from_numpy(tokens).view(-1, seq)


def calibrate_checkpoint(args) -> dict:
    from megatron_qsparse.config import validate
    from megatron_qsparse.convert.layout import write_checkpoint
    from megatron_qsparse.sparsity import describe
    from megatron_qsparse.sparsity.methods.threshold import calibrate, threshold_at
    from megatron_qsparse.training.checkpointing import load_model, resolve_checkpoint

    if not 0.0 <= args.sparsity < 1.0:
        raise ConfigError(f"--sparsity: {args.sparsity} is outside [0, 1); give the fraction of "
                          "features to zero, e.g. 0.4")
    for name in ("calibration_tokens", "micro_batch_size"):
        if getattr(args, name) < 1:
            raise ConfigError(f"--{name.replace('_', '-')}: got {getattr(args, name)}; use a "
                              "positive number")
    folder = resolve_checkpoint(args.load)
    save_root = os.path.dirname(folder.rstrip(os.sep))
    if os.path.abspath(args.save) in (os.path.abspath(save_root), os.path.abspath(folder)):
        raise ConfigError("--save: it is --load's save directory; write the calibrated "
                          "checkpoint to a new directory (the original stays as it is)")
    model, cfg = load_model(folder)
    seq = args.seq_length or cfg.model.seq_length
    max_len = cfg.model.max_position_embeddings or cfg.model.seq_length
    if not 1 <= seq <= max_len:
        raise ConfigError(f"--seq-length: {seq} is outside [1, {max_len}] (the model's positions)")
    windows = _windows(args.data_path, cfg.data.split, args.split_name, seq,
                       args.calibration_tokens)
    batches = windows.split(args.micro_batch_size)
    calibration = calibrate(model, batches, seed=args.seed)

    new = copy.deepcopy(cfg)
    q = new.qsparse
    q.mode, q.ratio, q.calibration = "threshold", float(args.sparsity), calibration
    for kind in PROJECTION_KINDS:
        setattr(q, f"{kind}_ratio", None)
    q.warmup_iters, q.rescale = 0, "none"
    # check the model and sparsity settings (a converted checkpoint records no data settings)
    validate(Config(model=new.model, qsparse=q, parallel=new.parallel,
                    data=DataConfig(data_path=["unused"], tokenizer_type="ByteTokenizer")))
    state = model.state_dict()
    out = write_checkpoint(args.save, new, lambda: iter(state.items()),
                           extra_meta={"calibrated_from": folder})
    tables = calibration["thresholds"]
    per_kind = {k: [threshold_at(t, args.sparsity) for key, t in tables.items()
                    if key.endswith("/" + k)] for k in PROJECTION_KINDS}
    return {"folder": out, "source": folder, "tokens": calibration["tokens"],
            "describe": describe(q),
            "mean_threshold": {k: sum(v) / len(v) for k, v in per_kind.items() if v}}


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        r = calibrate_checkpoint(args)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"calibrated {r['source']} on {r['tokens']:,} tokens -> {r['folder']} ({r['describe']})")
    print("  mean threshold per projection kind: " + ", ".join(
        f"{k} {v:.4g}" for k, v in r["mean_threshold"].items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
