#!/usr/bin/env python
"""Convert checkpoints: Hugging Face LLaMA/Mistral/Qwen2 <-> megatron-qsparse, and re-shard.

  import-hf  a Hugging Face directory (config.json + safetensors) -> our checkpoint at any
             tensor-parallel size, ready for `pretrain_qsparse.py --load DIR --finetune
             --config DIR/model_args.yaml ...` (continue-training / SFT).
  export-hf  our checkpoint -> a Hugging Face directory that `transformers` loads; config.json
             records the Q-Sparse settings in a "qsparse" section.
  reshard    our checkpoint -> the same weights at another tensor-parallel size.

Weights are read lazily (one tensor at a time from safetensors or memory-mapped checkpoint
files) and written one tensor-parallel shard at a time: converting a 7B model needs about one
shard plus one tensor of memory. Pipeline-parallel layouts (PP > 1) are not supported yet.

Examples:
  python tools/checkpoint_convert.py import-hf --hf-dir Mistral-7B-v0.1 --save ckpt/mistral \\
      --target-tensor-parallel-size 2 --tokenizer-model Mistral-7B-v0.1/tokenizer.model
  python tools/checkpoint_convert.py export-hf --load ckpt/run --save hf/run --dtype bfloat16
  python tools/checkpoint_convert.py reshard --load ckpt/run --save ckpt/run-tp1 \\
      --target-tensor-parallel-size 1
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys


from megatron_qsparse.config import (Config, ConfigError, QSparseConfig,  # noqa: E402
                                     padded_vocab_size, validate)


def _add_qsparse_flags(p: argparse.ArgumentParser) -> None:
    """The Q-Sparse flags of pretrain_qsparse.py (from the dataclass), recorded in the checkpoint;
    only the ones given override what the source holds."""
    g = p.add_argument_group("sparsity recorded in the checkpoint (default: the source's; "
                             "dense for a plain Hugging Face model)")
    for f in dataclasses.fields(QSparseConfig):
        flag = f.metadata.get("flag") or "--" + f.name.replace("_", "-")
        kw = {"dest": "qs_" + f.name, "default": argparse.SUPPRESS, "help": f.metadata["help"]}
        if isinstance(f.default, bool):
            kw["action"] = "store_false" if f.default else "store_true"
        else:
            kw["type"] = {"int": int, "float": float, "str": str}.get(
                f.type.split(" ")[0], float)
            if f.metadata.get("choices"):
                kw["choices"] = f.metadata["choices"]
            else:
                kw["metavar"] = flag.lstrip("-").replace("-", "_").upper()
        g.add_argument(flag, **kw)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="\n".join(__doc__.splitlines()[2:]))
    sub = p.add_subparsers(dest="command", required=True)

    imp = sub.add_parser("import-hf", help="Hugging Face directory -> our checkpoint.")
    imp.add_argument("--hf-dir", required=True, help="config.json + *.safetensors directory.")
    imp.add_argument("--save", required=True, help="Save directory of the new checkpoint.")
    imp.add_argument("--seq-length", type=int, default=None,
                     help="Sequence length recorded in model_args.yaml; default: the model's "
                     "positions, at most 4096.")
    imp.add_argument("--tokenizer-model", default=None,
                     help="Tokenizer recorded in the checkpoint (and copied on export): a "
                     "SentencePiece file or a tokenizer directory; default: "
                     "HF_DIR/tokenizer.model when present.")
    for cmd in (imp,):
        _add_layout_flags(cmd)
        _add_dtype_flag(cmd, "float32")
        _add_qsparse_flags(cmd)

    exp = sub.add_parser("export-hf", help="Our checkpoint -> Hugging Face directory.")
    exp.add_argument("--load", required=True, help="Save directory (its 'latest') or iter_*.")
    exp.add_argument("--save", required=True, help="New Hugging Face directory.")
    exp.add_argument("--model-type", choices=("llama", "mistral", "qwen2"), default=None,
                     help="Architecture to write; default: the imported model's, else qwen2 "
                     "with a q/k/v bias and llama without.")
    exp.add_argument("--max-shard-size", default="5GB", help="Largest safetensors file.")
    _add_dtype_flag(exp, None)

    rs = sub.add_parser("reshard", help="Our checkpoint at another tensor-parallel size.")
    rs.add_argument("--load", required=True, help="Save directory (its 'latest') or iter_*.")
    rs.add_argument("--save", required=True, help="Save directory of the new checkpoint.")
    _add_layout_flags(rs)
    return p


def _add_layout_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--target-tensor-parallel-size", type=int, default=1,
                   help="Tensor-parallel size of the written checkpoint.")
    p.add_argument("--target-pipeline-model-parallel-size", type=int, default=1,
                   help="Pipeline-parallel size of the written checkpoint (DeepSpeed's "
                   "per-layer files).")


def _add_dtype_flag(p: argparse.ArgumentParser, default) -> None:
    p.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default=default,
                   help="Weight dtype written" + ("" if default else "; default: as stored."))


def _layout(cfg: Config, args) -> None:
    from megatron_qsparse.convert.layout import vocab_divisor

    cfg.parallel.tensor_model_parallel_size = args.target_tensor_parallel_size
    cfg.parallel.pipeline_model_parallel_size = args.target_pipeline_model_parallel_size
    cfg.model.make_vocab_size_divisible_by = vocab_divisor(
        cfg.model.vocab_size, args.target_tensor_parallel_size,
        cfg.model.make_vocab_size_divisible_by)


def _apply_qsparse(cfg: Config, args) -> None:
    for k, v in vars(args).items():
        if k.startswith("qs_"):
            setattr(cfg.qsparse, k[3:], v)


def _validate_model(cfg: Config) -> None:
    """Validate the model/sparsity/layout settings (no data is needed to convert)."""
    c = Config.from_dict(cfg.to_dict())
    c.data.data_path = ["unused"]
    c.data.tokenizer_type = "ByteTokenizer"
    c.parallel.deepspeed_config = None
    validate(c)


def import_hf(args) -> str:
    from megatron_qsparse.convert import hf
    from megatron_qsparse.convert.layout import write_checkpoint

    hf_cfg = hf.read_hf_config(args.hf_dir)
    cfg = Config()
    cfg.model = hf.model_config_from_hf(hf_cfg, args.seq_length)
    cfg.qsparse = hf.qsparse_config_from_hf(hf_cfg)
    _apply_qsparse(cfg, args)
    _layout(cfg, args)
    tok = args.tokenizer_model or os.path.join(args.hf_dir, "tokenizer.model")
    if os.path.exists(tok):
        cfg.data.tokenizer_model = os.path.abspath(tok)
    cfg.train.bf16 = args.dtype == "bfloat16"
    _validate_model(cfg)
    source = hf.hf_source(args.hf_dir, cfg.model, padded_vocab_size(cfg.model.vocab_size, cfg),
                          hf.DTYPES[args.dtype])
    return write_checkpoint(args.save, cfg, source, extra_meta={
        "converted_from": {"hf_dir": os.path.abspath(args.hf_dir), "hf_config": hf_cfg}})


def export_hf(args) -> str:
    from megatron_qsparse.checkpoint import read_checkpoint
    from megatron_qsparse.convert import hf

    cfg, meta, source = read_checkpoint(args.load)
    base = (meta.get("converted_from") or {}).get("hf_config")
    model_type = args.model_type or (base or {}).get("model_type") or \
        ("qwen2" if cfg.model.add_qkv_bias else "llama")
    config = hf.hf_config_from_ours(cfg, model_type, base, args.dtype or "float32")
    hf.write_hf_dir(args.save, config, hf.to_hf_tensors(source, cfg.model),
                    max_shard_bytes=hf.parse_size(args.max_shard_size),
                    dtype=hf.DTYPES[args.dtype] if args.dtype else None,
                    tokenizer_model=cfg.data.tokenizer_model)
    return args.save


def reshard(args) -> str:
    from megatron_qsparse.checkpoint import read_checkpoint
    from megatron_qsparse.convert.layout import repad_vocab, write_checkpoint

    cfg, meta, source = read_checkpoint(args.load)
    _layout(cfg, args)
    _validate_model(cfg)
    source = repad_vocab(source, cfg.model.vocab_size,
                         padded_vocab_size(cfg.model.vocab_size, cfg))
    keep = {k: v for k, v in meta.items() if k == "converted_from"}
    return write_checkpoint(args.save, cfg, source, iteration=int(meta.get("iteration", 0)),
                            extra_meta=keep)


def main(argv: list[str] | None = None) -> int:
    import logging

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    args = build_parser().parse_args(argv)
    try:
        out = {"import-hf": import_hf, "export-hf": export_hf, "reshard": reshard}[
            args.command](args)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
