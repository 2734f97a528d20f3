#!/usr/bin/env python
"""Evaluate a checkpoint: perplexity / bits per byte, or lm-evaluation-harness tasks.

perplexity: sliding-window perplexity of a preprocessed dataset (--data-path PREFIX, optionally
  one split of the checkpoint's --split) or of a JSON-lines file (--jsonl FILE), with the bits per
  byte of the text and the density every projection measured during the run. The checkpoint's
  sparsity is used unless --qsparse-mode / --qsparse-ratio override it. A tensor-parallel
  checkpoint runs in one process (its shards merged) or, launched with as many processes as it
  has shards (deepspeed --num_gpus TP tools/evaluate.py perplexity ...), one shard per process.

lm-eval: lm-evaluation-harness's own command line (lm_eval 0.4.13) with our model registered as
  `qsparse`; every argument after `lm-eval` goes to it, except --summary-json FILE (ours: the
  measured density and activated parameters of the run).

table: the paper's results table (rows: runs, columns: activated parameters, ARC-C, HellaSwag,
  WinoGrande, MMLU, TruthfulQA, average) from folders written by examples/eval_paper_suite.sh.

Examples:
  python tools/evaluate.py perplexity --load ckpt/ --jsonl valid.jsonl --stride 512 --json ppl.json
  python tools/evaluate.py perplexity --load ckpt/ --data-path data/corpus_text_document \\
      --split-name valid --max-tokens 1000000
  python tools/evaluate.py lm-eval --model qsparse --model_args load=ckpt/,sparsity=0.6 \\
      --tasks arc_challenge --num_fewshot 25 --batch_size 8
  python tools/evaluate.py table --run dense=eval/dense --run "Q-Sparse S=0.4=eval/qs40"
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time


from megatron_qsparse.config import PROJECTION_KINDS, ConfigError  # noqa: E402
from megatron_qsparse.sparsity import describe, method_names, summary  # noqa: E402


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="\n".join(__doc__.splitlines()[2:]))
    # the deepspeed launcher passes --local_rank; LOCAL_RANK from the environment is what is used
    p.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    sub = p.add_subparsers(dest="command", required=True, metavar="{perplexity,lm-eval,table}")
    ppl = sub.add_parser("perplexity", help="Sliding-window perplexity and bits per byte.")
    ppl.add_argument("--load", required=True, help="Save directory (uses 'latest') or iter_* "
                     "folder.")
    src = ppl.add_mutually_exclusive_group(required=True)
    src.add_argument("--data-path", help="Preprocessed dataset prefix (.bin/.idx).")
    src.add_argument("--jsonl", help="JSON-lines file, one document per line.")
    ppl.add_argument("--text-key", default="text", help="Field holding the text in --jsonl.")
    ppl.add_argument("--split-name", choices=("all", "train", "valid", "test"), default="all",
                     help="With --data-path: which document range of --split to read.")
    ppl.add_argument("--split", default=None,
                     help="Train,valid,test proportions for --split-name; default: the "
                     "checkpoint's --split.")
    ppl.add_argument("--seq-length", type=int, default=None,
                     help="Tokens of context per window; default: the model's --seq-length.")
    ppl.add_argument("--stride", type=int, default=None,
                     help="How far each window advances (1..seq-length); only the last "
                     "`stride` predictions of a window after the first are scored. Default: "
                     "seq-length (disjoint windows).")
    ppl.add_argument("--max-tokens", type=int, default=None,
                     help="Read at most this many tokens (documents in order, the last one cut).")
    ppl.add_argument("--micro-batch-size", type=int, default=4, help="Windows per forward pass.")
    ppl.add_argument("--qsparse-mode", choices=method_names(), default=None,
                     help="Override the sparsifier the checkpoint was trained with.")
    ppl.add_argument("--qsparse-ratio", type=float, default=None,
                     help="Override the sparsity ratio S of every projection.")
    ppl.add_argument("--tokenizer-model", default=None,
                     help="The checkpoint's SentencePiece model, if its stored path moved.")
    ppl.add_argument("--decode-weight-dtype", choices=("model", "bfloat16", "float16", "int8"),
                     default="model",
                     help="Score with the projection and LM-head weights rounded as "
                          "tools/generate.py --decode-weight-dtype holds them (int8: "
                          "per-output-channel codes x scales): the accuracy cost of that storage.")
    ppl.add_argument("--json", default=None, help="Also write the results to this JSON file.")
    sub.add_parser("lm-eval", help="lm-evaluation-harness with the `qsparse` model registered "
                   "(arguments after it go to lm_eval; --summary-json FILE is ours).",
                   add_help=False)
    sub.add_parser("table", help="The paper's table (markdown) from eval_paper_suite.sh "
                   "folders: --run LABEL=DIR ...", add_help=False)
    return p


def _distributed(ckpt_tp: int):
    """The ParallelState when launched with several processes (one per TP shard), else None.

    Evaluation needs no DeepSpeed engine, so the process group is torch's own (gloo on CPU,
    NCCL on GPUs) from the launcher's RANK / WORLD_SIZE / MASTER_* variables.
    """
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return None
    import torch

    from megatron_qsparse.parallel.state import initialize_model_parallel

    world = int(os.environ["WORLD_SIZE"])
    if world != ckpt_tp:
        raise ConfigError(f"launched with {world} processes but the checkpoint has {ckpt_tp} "
                          f"tensor-parallel shard(s); launch {ckpt_tp} processes or run one "
                          "process (shards are merged)")
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    if not torch.distributed.is_initialized():
        torch.distributed.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    return initialize_model_parallel(ckpt_tp, 1)


def perplexity(args) -> dict:
    import torch

    from megatron_qsparse.checkpoint import read_meta
    from megatron_qsparse.data.gpt_dataset import parse_split, split_document_ranges
    from megatron_qsparse.evaluation.loading import build_eval_tokenizer, load_for_eval
    from megatron_qsparse.evaluation.perplexity import (indexed_stream, jsonl_stream,
                                                        sliding_window_nll)

    _, meta = read_meta(args.load)
    parallel = _distributed(int(meta.get("tensor_model_parallel_size", 1)))
    device = "cpu"
    if torch.cuda.is_available():
        device = torch.device("cuda", torch.cuda.current_device())
    em = load_for_eval(args.load, qsparse_mode=args.qsparse_mode,
                       qsparse_ratio=args.qsparse_ratio, parallel=parallel, device=device)
    wdtype = {"model": None, "bfloat16": torch.bfloat16, "float16": torch.float16,
              "int8": torch.int8}[getattr(args, "decode_weight_dtype", "model")]
    if wdtype is not None:
        if parallel is not None and parallel.tp_size > 1:
            raise ConfigError("--decode-weight-dtype: run it in one process (the checkpoint's "
                              "shards merged); per-output scales need whole matrices")
        from megatron_qsparse.inference.linear import round_trip_decode_weights
        round_trip_decode_weights(em.model, wdtype)
    tok = build_eval_tokenizer(em.cfg, args.tokenizer_model)
    seq = args.seq_length or em.cfg.model.seq_length
    if not 1 <= seq <= em.max_length:
        raise ConfigError(f"--seq-length: {seq} is outside [1, {em.max_length}] (the model's "
                          "positions)")
    if args.max_tokens is not None and args.max_tokens < 2:
        raise ConfigError(f"--max-tokens: got {args.max_tokens}; use at least 2")
    if args.jsonl:
        if args.split_name != "all":
            raise ConfigError("--split-name: applies to --data-path only; drop it for --jsonl")
        stream = jsonl_stream(args.jsonl, tok, args.text_key, args.max_tokens)
        source = args.jsonl
    else:
        doc_range = None
        if args.split_name != "all":
            from megatron_qsparse.data.indexed_dataset import IndexedDataset
            if not IndexedDataset.exists(args.data_path):
                raise ConfigError(f"--data-path: {args.data_path}.bin/.idx not found; give the "
                                  "prefix tools/preprocess_data.py wrote")
            try:
                fractions = parse_split(args.split or em.cfg.data.split)
            except ValueError as e:
                raise ConfigError(f"--split: {e}") from None
            n_docs = len(IndexedDataset(args.data_path))
            bounds = split_document_ranges(fractions, n_docs)
            k = ("train", "valid", "test").index(args.split_name)
            doc_range = (bounds[k], bounds[k + 1])
            if doc_range[0] == doc_range[1]:
                raise ConfigError(f"--split-name: the split {args.split or em.cfg.data.split!r} "
                                  f"leaves {args.split_name} no documents; pick another")
        stream = indexed_stream(args.data_path, tok, doc_range, args.max_tokens)
        source = args.data_path + ("" if args.split_name == "all" else f" ({args.split_name})")
    if len(stream.tokens) < 2:
        raise ConfigError("the input holds no tokens to score; check --jsonl/--data-path")
    t0 = time.perf_counter()
    r = sliding_window_nll(em.model, stream.tokens, seq, args.stride, args.micro_batch_size,
                           device)
    elapsed = time.perf_counter() - t0
    r.bytes, r.documents = stream.bytes, stream.documents
    q = em.cfg.qsparse
    out = {"checkpoint": em.folder, "source": source, **r.to_dict(),
           **summary(q), "qsparse": describe(q),
           "checkpoint_tensor_parallel_size": em.checkpoint_tp,
           "decode_weight_dtype": getattr(args, "decode_weight_dtype", "model"),
           "tensor_parallel_size": 1 if parallel is None else parallel.tp_size,
           "seconds": elapsed}
    from megatron_qsparse.model.accounting import activated_parameters, count_parameters
    out["activated_parameters"] = activated_parameters(em.model, r.density)
    out["non_embedding_parameters"] = count_parameters(em.model, non_embedding=True)
    return out


def print_report(out: dict) -> None:
    print(f"checkpoint {out['checkpoint']} ({out['qsparse']}) on {out['source']}")
    print(f"  documents           {out['documents']:,}")
    print(f"  tokens scored       {out['tokens']:,} in {out['windows']:,} windows of "
          f"{out['seq_length']} (stride {out['stride']})")
    print(f"  mean NLL            {out['mean_nll']:.4f} nats/token")
    print(f"  perplexity          {out['perplexity']:.4f}"
          + (f"  (weights rounded as decode dtype {out['decode_weight_dtype']})"
             if out.get("decode_weight_dtype", "model") != "model" else ""))
    bpb = out["bits_per_byte"]
    print(f"  bits per byte       {bpb:.4f}  ({out['bytes']:,} UTF-8 bytes)" if bpb is not None
          else "  bits per byte       n/a (no text bytes)")
    d = out["density"]
    print("  measured density    " + "  ".join(f"{k} {d[f'kind/{k}']:.3f}"
                                             for k in PROJECTION_KINDS if f"kind/{k}" in d))
    share = out["activated_parameters"] / out["non_embedding_parameters"]
    print(f"  activated params    {out['activated_parameters']:,.0f} of "
          f"{out['non_embedding_parameters']:,} non-embedding ({share:.1%})")
    print(f"  time                {out['seconds']:.1f} s")


def lm_eval_main(argv: list[str]) -> int:
    """lm_eval's CLI (``lm_eval [run] --model qsparse ...``) with our adapter registered.

    ``--summary-json FILE`` (ours, taken out before lm_eval sees the arguments) writes the
    checkpoint, sparsity, measured density and activated parameters of the run.
    """
    summary_json = None
    if "--summary-json" in argv:
        i = argv.index("--summary-json")
        if i + 1 >= len(argv):
            raise ConfigError("--summary-json: needs a file name")
        summary_json = argv[i + 1]
        argv = argv[:i] + argv[i + 2:]
    import megatron_qsparse.evaluation.lm_eval_adapter as adapter  # registers `qsparse`
    from lm_eval.__main__ import cli_evaluate

    sys.argv = ["lm_eval", *argv]
    cli_evaluate()
    s = adapter.QSparseLM.last_summary
    if s:
        d = s["density"]
        print("measured density over the run: " + "  ".join(
            f"{k} {d[f'kind/{k}']:.3f}" for k in PROJECTION_KINDS if f"kind/{k}" in d))
        print(f"activated parameters per token: {s['activated_parameters']:,.0f} of "
              f"{s['non_embedding_parameters']:,} non-embedding")
        if summary_json:
            from megatron_qsparse.atomic import write_text
            write_text(summary_json, json.dumps(s, indent=1, sort_keys=True))
    return 0


def table_main(argv: list[str]) -> int:
    """The paper's table (markdown) from eval_paper_suite.sh output folders."""
    from megatron_qsparse.evaluation.table import markdown_table

    p = argparse.ArgumentParser(prog="evaluate.py table", description=table_main.__doc__)
    p.add_argument("--run", action="append", required=True, metavar="LABEL=DIR",
                   help="A row: its label and the OUT folder of eval_paper_suite.sh (repeat).")
    args = p.parse_args(argv)
    runs = []
    for item in args.run:
        label, sep, folder = item.rpartition("=")  # labels may hold "=" (S=0.4)
        if not sep or not label or not folder:
            raise ConfigError(f"--run: {item!r} is not LABEL=DIR; e.g. --run 'Q-Sparse S=0.4=out'")
        runs.append((label, folder))
    print(markdown_table(runs))
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in ("lm-eval", "table"):
        try:
            return (lm_eval_main if argv[0] == "lm-eval" else table_main)(argv[1:])
        except ConfigError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        out = perplexity(args)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    rank = int(os.environ.get("RANK", "0"))
    if rank == 0:
        print_report(out)
        if args.json:
            from megatron_qsparse.atomic import write_text
            write_text(args.json, json.dumps(out, indent=1, sort_keys=True))
            print(f"  json                {args.json}")
    import torch
    if torch.distributed.is_initialized():
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
