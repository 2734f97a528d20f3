#!/usr/bin/env python
"""Generate text from a checkpoint with a KV cache; prints the text and decode tokens/s.

The tokenizer is the checkpoint's (its --tokenizer-type / --tokenizer-model; a relative model
path is looked up from the current directory, then the repository root). Each projection keeps
the sparsifier it was trained with; with --sparse-kernel on (default) one-token decode steps read
only the weight rows of the kept inputs (compiled CPU kernel), the prompt runs as dense matmuls on
the sparsified inputs. With --compiled-step on (default) each decode step is one compiled call for
the whole model where it covers the model (fp32, plain Top-K or dense projections), else the
projections run one kernel call each. Batch size 1.

Examples:
  python tools/generate.py --load ckpt/ --prompt "In the beginning" --max-new-tokens 64 --greedy
  python tools/generate.py --load ckpt/ --prompt "And God said" --temperature 0.8 --top-p 0.9 --seed 1
"""

from __future__ import annotations

import argparse
import logging
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402

from megatron_qsparse.config import ConfigError  # noqa: E402

# --decode-weight-dtype: name -> storage dtype (None: the model's own)
WEIGHT_DTYPES = {"model": None, "bfloat16": torch.bfloat16, "float16": torch.float16,
                 "fp16": torch.float16, "int8": torch.int8}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="\n".join(__doc__.splitlines()[2:]))
    p.add_argument("--load", required=True, help="Save directory (uses 'latest') or iter_* folder.")
    p.add_argument("--prompt", default="", help="Prompt text; empty starts from end-of-document.")
    p.add_argument("--max-new-tokens", type=int, default=64, help="Tokens to generate at most.")
    p.add_argument("--greedy", action="store_true", help="Greedy decoding (argmax).")
    p.add_argument("--temperature", type=float, default=1.0,
                   help="Sampling temperature (0 = greedy).")
    p.add_argument("--top-p", type=float, default=1.0, help="Nucleus sampling mass (1 = off).")
    p.add_argument("--seed", type=int, default=None, help="Seed of the sampler.")
    p.add_argument("--sparse-kernel", choices=("on", "off"), default="on",
                   help="Sparse GEMV for decode steps (off: dense matmuls on sparsified inputs).")
    p.add_argument("--compiled-step", choices=("on", "off"), default="on",
                   help="One compiled call per decode step for the whole model (off: layer by "
                        "layer, one kernel call per projection). Needs --sparse-kernel on.")
    p.add_argument("--decode-weight-dtype", choices=tuple(WEIGHT_DTYPES), default="model",
                   help="Storage of the input-major decode weights and the LM head: bfloat16 / "
                        "float16 halve the traffic, int8 (per-output-channel scales) quarters it.")
    p.add_argument("--ignore-eod", action="store_true", help="Keep going past end-of-document.")
    p.add_argument("--tokenizer-model", default=None,
                   help="Override the checkpoint's tokenizer model file.")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's).")
    p.add_argument("--profile", action="store_true",
                   help="Print where a decode step's time goes (compiled step only): selection, "
                        "products, partial sums, LM head, attention, activation, the rest.")
    return p


def _tokenizer(cfg, override: str | None):
    from megatron_qsparse.data.tokenizer import build_tokenizer

    path = override or cfg.data.tokenizer_model
    if path and not os.path.isfile(path) and not override and os.path.isfile(os.path.join(ROOT, path)):
        path = os.path.join(ROOT, path)
    if path and not os.path.isfile(path):
        where = "" if override else " (the checkpoint's)"
        raise ConfigError(f"--tokenizer-model: {path}{where} is not a file; pass "
                          "--tokenizer-model PATH")
    try:
        return build_tokenizer(cfg.data.tokenizer_type, path)
    except (ValueError, OSError) as e:
        raise ConfigError(f"--tokenizer-model: {e}") from None


def run(args) -> int:
    from megatron_qsparse.inference import generate, load_inference_model
    from megatron_qsparse.sparsity import describe

    if args.threads:
        torch.set_num_threads(args.threads)
    dtype = WEIGHT_DTYPES[args.decode_weight_dtype]
    model, cfg = load_inference_model(args.load, sparse_kernel=args.sparse_kernel == "on",
                                      weight_dtype=dtype,
                                      compiled_step=args.compiled_step == "on")
    tok = _tokenizer(cfg, args.tokenizer_model)
    prompt = tok.tokenize(args.prompt) if args.prompt else []
    if not prompt:
        prompt = [tok.eod]
    stop = () if args.ignore_eod or tok.eod < 0 else (tok.eod,)
    try:
        out = generate(model, prompt, args.max_new_tokens, greedy=args.greedy,
                       temperature=args.temperature, top_p=args.top_p, seed=args.seed,
                       vocab_size=tok.vocab_size, stop_ids=stop, profile=args.profile)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    q = cfg.qsparse
    mode = describe(q)
    paths = ", ".join(f"{n} {p}" for p, n in sorted(model.decode_paths().items()))
    text = tok.detokenize(prompt + out.tokens) if args.prompt else tok.detokenize(out.tokens)
    print(text)
    print(f"--- {len(out.tokens)} tokens; prompt {out.prompt_tokens} tokens in "
          f"{out.prefill_seconds * 1e3:.1f} ms; decode {out.decode_tokens_per_second:.1f} tokens/s; "
          f"{mode}{' + BitNet b1.58' if q.bitnet else ''}; projections: {paths}"
          + (f"; decode weights {args.decode_weight_dtype}" if dtype is not None else "")
          + ("; stopped at end-of-document" if out.stopped_at_eod else ""), file=sys.stderr)
    if args.profile:
        print(profile_line(out.profile), file=sys.stderr)
    return 0


def profile_line(ms: dict[str, float] | None) -> str:
    """The --profile summary: ms per decode step by phase, and each phase's share."""
    if not ms:
        return "--- profile: no compiled decode step ran (layer-by-layer path or no decode step)"
    step = ms["step"]
    parts = [f"{k} {ms[k]:.3f} ({100 * ms[k] / step:.0f}%)"
             for k in ("select", "products", "head", "attention", "activation", "other")]
    kinds = ", ".join(f"{k} {ms[k]:.3f}" for k in ("qkv", "o", "gate_up", "down", "router")
                      if ms[k] > 0)
    return (f"--- profile, ms per decode step: {step:.3f} = " + ", ".join(parts)
            + f"; products by projection: {kinds}; partial sums {ms['reduce']:.3f} (the calling"
            " thread's share, in products and head)")


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    args = build_parser().parse_args(argv)
    try:
        return run(args)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
