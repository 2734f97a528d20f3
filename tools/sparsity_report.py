#!/usr/bin/env python
"""Measured sparsity of a trained checkpoint: density per layer and projection, activated params.

Runs the checkpoint's model (with the sparsity it was trained with, or ``--qsparse-ratio`` /
``--qsparse-mode`` overrides) over ``--batches`` batches of a preprocessed dataset and prints the
fraction of non-zero inputs each projection actually received, the activated parameters per
token and the activated share of the non-embedding parameters. Optionally writes the table as
CSV and a PNG heat map (layers x projection kinds).

Example:
  python tools/sparsity_report.py --load ckpt/ --batches 8 --csv density.csv --plot density.png
"""

from __future__ import annotations

import argparse
import os
import sys


import numpy as np  # noqa: E402
import torch  # noqa: E402

from megatron_qsparse.config import PROJECTION_KINDS, ConfigError  # noqa: E402
from megatron_qsparse.sparsity import describe, method_names  # noqa: E402


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="\n".join(__doc__.splitlines()[2:]))
    p.add_argument("--load", required=True, help="Save directory (uses 'latest') or iter_* folder.")
    p.add_argument("--data-path", nargs="+", default=None,
                   help="Dataset prefix(es); default: the checkpoint's --data-path.")
    p.add_argument("--split-name", choices=("train", "valid", "test"), default="valid",
                   help="Which split of --split to read.")
    p.add_argument("--batches", type=int, default=8, help="Batches to run.")
    p.add_argument("--micro-batch-size", type=int, default=None,
                   help="Sequences per batch; default: the checkpoint's.")
    p.add_argument("--qsparse-mode", choices=method_names(), default=None,
                   help="Override the sparsifier the checkpoint was trained with.")
    p.add_argument("--qsparse-ratio", type=float, default=None, help="Override the ratio S.")
    p.add_argument("--csv", help="Write layer,kind,density rows here.")
    p.add_argument("--plot", help="Write a PNG heat map of density here.")
    return p


def report(args) -> dict:
    from megatron_qsparse.checkpoint import load_model
    from megatron_qsparse.config import validate
    from megatron_qsparse.data.gpt_dataset import build_train_valid_test_datasets
    from megatron_qsparse.data.sampler import build_pretraining_data_loader
    from megatron_qsparse.model.accounting import activated_parameters, count_parameters
    from megatron_qsparse.model.gpt import GPTModel
    from megatron_qsparse.sparsity import collect_density, reset_density, set_recording

    model, cfg = load_model(args.load)
    if args.qsparse_mode is not None or args.qsparse_ratio is not None:
        if args.qsparse_mode is not None:
            cfg.qsparse.mode = args.qsparse_mode
        if args.qsparse_ratio is not None:
            cfg.qsparse.ratio = args.qsparse_ratio
        if args.data_path:
            cfg.data.data_path = list(args.data_path)
        validate(cfg)
        state = model.state_dict()
        model = GPTModel(cfg.model, model.vocab_size)
        model.load_state_dict(state)
        model.eval()
    data_path = list(args.data_path or cfg.data.data_path)
    if args.batches <= 0:
        raise ConfigError(f"--batches: got {args.batches}; use a positive number")
    mbs = args.micro_batch_size or cfg.train.micro_batch_size
    which = ("train", "valid", "test").index(args.split_name)
    wanted = [0, 0, 0]
    wanted[which] = args.batches * mbs
    try:
        datasets = build_train_valid_test_datasets(data_path, cfg.data.split, cfg.model.seq_length,
                                                   cfg.train.seed, tuple(wanted),
                                                   cache_dir=cfg.data.data_cache_path)
    except (ValueError, FileNotFoundError) as e:
        raise ConfigError(f"--data-path: {e}") from None
    dataset = datasets[which]
    if dataset is None:
        raise ConfigError(f"--split-name: the checkpoint's --split {cfg.data.split!r} has no "
                          f"{args.split_name} documents; pick another split")
    loader = build_pretraining_data_loader(dataset, 0, mbs, 0, 1)
    set_recording(model, True)
    reset_density(model)
    losses = []
    with torch.no_grad():
        for i, batch in enumerate(loader):
            if i >= args.batches:
                break
            tokens = batch["tokens"]
            losses.append(model(tokens[:, :-1], tokens[:, 1:]).float().mean().item())
    density = collect_density(model)
    return {"cfg": cfg, "density": density, "loss": float(np.mean(losses)),
            "activated": activated_parameters(model, density),
            "non_embedding": count_parameters(model, non_embedding=True),
            "tokens": len(losses) * mbs * cfg.model.seq_length}


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        r = report(args)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    cfg, density = r["cfg"], r["density"]
    layers = cfg.model.num_layers
    q = cfg.qsparse
    print(f"checkpoint {args.load}: {layers} layers, hidden {cfg.model.hidden_size}, "
          f"{describe(q)}" +
          f"; {r['tokens']} tokens, loss {r['loss']:.4f}")
    print(f"{'layer':>6} " + " ".join(f"{k:>8}" for k in PROJECTION_KINDS))
    rows = []
    for i in range(layers):
        vals = [density.get(f"layer{i}/{k}", float("nan")) for k in PROJECTION_KINDS]
        rows.append(vals)
        print(f"{i:>6} " + " ".join(f"{v:>8.3f}" for v in vals))
    print(f"{'all':>6} " + " ".join(f"{density.get(f'kind/{k}', float('nan')):>8.3f}"
                                    for k in PROJECTION_KINDS))
    share = r["activated"] / r["non_embedding"]
    print(f"activated parameters per token: {r['activated']:,.0f} of {r['non_embedding']:,} "
          f"non-embedding ({share:.1%}; sparsity {1 - share:.1%})")
    from megatron_qsparse.training.checkpointing import atomic_write_text
    if args.csv:
        text = "layer,kind,density\n" + "".join(
            f"{i},{k},{v}\n" for i, vals in enumerate(rows) for k, v in zip(PROJECTION_KINDS, vals))
        atomic_write_text(args.csv, text)
        print(f"csv: {args.csv}")
    if args.plot:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(5, 0.4 * layers + 2))
        im = ax.imshow(np.array(rows), vmin=0, vmax=1, cmap="viridis", aspect="auto")
        ax.set_xticks(range(len(PROJECTION_KINDS)), PROJECTION_KINDS)
        ax.set_yticks(range(layers))
        ax.set_ylabel("layer")
        ax.set_title("measured input density")
        fig.colorbar(im, ax=ax)
        fig.tight_layout()
        tmp = os.path.join(os.path.dirname(os.path.abspath(args.plot)),
                           ".tmp-" + os.path.basename(args.plot))
        fig.savefig(tmp, format="png", dpi=110)
        os.replace(tmp, args.plot)
        print(f"plot: {args.plot}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
