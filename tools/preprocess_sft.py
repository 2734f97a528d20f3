#!/usr/bin/env python
"""Instruction jsonl -> tokens + loss-mask datasets for supervised fine-tuning (--data-format sft).

Each line is one sample: OpenOrca {"system_prompt", "question", "response"}, generic
{"input", "output"} (optional "system"), or Alpaca {"instruction", "input", "output"}. The prompt
is rendered with --template (alpaca: "### Instruction: ... ### Response:" plain text that any
base tokenizer handles; chatml: Qwen's <|im_start|> format) and tokenized as
[bos] prompt | response eos, the loss mask 1 exactly on "response eos".

Writes PREFIX_sft.{bin,idx} (tokens) and PREFIX_sft_mask.{bin,idx} (uint8 mask), Megatron's
indexed format, plus PREFIX_sft.json (counts). Inputs may be files, directories or globs, plain,
.gz or .zst. Bad lines are reported as file:line: reason and skipped (--strict stops instead).

Example:
  python tools/preprocess_sft.py --input openorca.jsonl --output-prefix data/openorca \\
      --tokenizer-type SentencePieceTokenizer --tokenizer-model tokenizer.model
  python pretrain_qsparse.py --data-format sft --data-path data/openorca_sft ...
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys


import numpy as np  # noqa: E402

from megatron_qsparse.data.sft_dataset import MASK_SUFFIX, TEMPLATES  # noqa: E402
from megatron_qsparse.data.tokenizer import TOKENIZER_TYPES  # noqa: E402


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="\n".join(__doc__.splitlines()[2:]))
    p.add_argument("--input", nargs="+", required=True, help="jsonl files, directories or globs.")
    p.add_argument("--output-prefix", required=True, help="Writes PREFIX_sft{,_mask}.{bin,idx}.")
    p.add_argument("--tokenizer-type", default="SentencePieceTokenizer",
                   choices=TOKENIZER_TYPES)
    p.add_argument("--tokenizer-model", default=None,
                   help="SentencePiece model file (HuggingFaceTokenizer: a tokenizer directory).")
    p.add_argument("--template", choices=sorted(TEMPLATES), default="alpaca",
                   help="Prompt template.")
    p.add_argument("--no-bos", action="store_true", help="Do not start samples with bos.")
    p.add_argument("--max-length", type=int, default=None,
                   help="Skip samples longer than this many tokens (default: keep all; training "
                   "truncates to --seq-length + 1).")
    p.add_argument("--strict", action="store_true", help="Stop at the first bad line.")
    p.add_argument("--allow-empty", action="store_true",
                   help="Write the dataset even when no sample came out of the input (by default "
                   "that is an error: exit status 2, nothing written).")
    return p


def main(argv: list[str] | None = None) -> int:
    from megatron_qsparse.data.corpus import expand_inputs
    from megatron_qsparse.data.tokenizer import build_tokenizer

    args = build_parser().parse_args(argv)
    try:
        tokenizer = build_tokenizer(args.tokenizer_type, args.tokenizer_model)
        paths = expand_inputs(args.input)
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    prefix = args.output_prefix + "_sft"
    out_dir = os.path.dirname(os.path.abspath(prefix))
    try:
        os.makedirs(out_dir, exist_ok=True)
        return _write(args, tokenizer, paths, prefix)
    except OSError as e:
        print(f"error: cannot write the dataset under {out_dir}: {e.strerror or e}; nothing was "
              "written; free space there or pass a writable --output-prefix", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("error: interrupted; nothing was written", file=sys.stderr)
        return 130


def _write(args, tokenizer, paths, prefix) -> int:
    from megatron_qsparse.data.corpus import iter_lines
    from megatron_qsparse.data.indexed_dataset import IndexedDatasetBuilder, best_token_dtype
    from megatron_qsparse.data.sft_dataset import encode, record_fields, render

    stats = {"samples": 0, "skipped_bad": 0, "skipped_long": 0, "tokens": 0, "loss_tokens": 0,
             "template": args.template, "tokenizer": tokenizer.name}
    shown = 0
    with IndexedDatasetBuilder(prefix, best_token_dtype(tokenizer.vocab_size)) as tok_b, \
            IndexedDatasetBuilder(prefix + MASK_SUFFIX, np.uint8) as mask_b:
        for path, lineno, raw in iter_lines(paths):
            if not raw.strip():
                continue
            try:
                rec = json.loads(raw)
                prompt, completion = render(args.template, *record_fields(rec))
            except ValueError as e:
                reason = f"{path}:{lineno}: {e}"
                if args.strict:
                    print(f"error: {reason}", file=sys.stderr)
                    tok_b.abort()
                    mask_b.abort()
                    return 2
                stats["skipped_bad"] += 1
                if shown < 10:
                    print(f"skipped {reason}", file=sys.stderr)
                    shown += 1
                continue
            tokens, mask = encode(tokenizer, prompt, completion, add_bos=not args.no_bos)
            if args.max_length and len(tokens) > args.max_length:
                stats["skipped_long"] += 1
                continue
            tok_b.add_document(tokens)
            mask_b.add_document(mask)
            stats["samples"] += 1
            stats["tokens"] += len(tokens)
            stats["loss_tokens"] += sum(mask)
        if stats["samples"] == 0 and not args.allow_empty:
            tok_b.abort()
            mask_b.abort()
            print(f"error: no samples came out of the input ({stats['skipped_bad']} bad and "
                  f"{stats['skipped_long']} too-long lines skipped); nothing was written; check "
                  "--input, --template and --max-length, or pass --allow-empty", file=sys.stderr)
            return 2
    from megatron_qsparse.atomic import write_text

    write_text(prefix + ".json", json.dumps(stats, indent=1) + "\n")
    print(f"wrote {prefix}.{{bin,idx}} and {prefix}{MASK_SUFFIX}.{{bin,idx}}: "
          f"{stats['samples']} samples, {stats['tokens']} tokens "
          f"({stats['loss_tokens']} trained), skipped {stats['skipped_bad']} bad and "
          f"{stats['skipped_long']} long lines")
    for gbs in (128,):
        print(f"one epoch at --global-batch-size {gbs}: --train-iters "
              f"{math.ceil(stats['samples'] / gbs)}")
    print(f"train with: --data-format sft --data-path {prefix}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
