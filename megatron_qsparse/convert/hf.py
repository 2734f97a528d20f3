"""Hugging Face LLaMA / Mistral / Qwen2 checkpoints <-> our model (state-dict adapter).

A Hugging Face directory (``config.json`` + ``model.safetensors`` or shards with
``model.safetensors.index.json``) is read lazily: :func:`hf_source` opens each safetensors file
with ``safe_open`` and reads one tensor (or the 2-3 parts of one fused tensor) at a time, so
importing a 7B model never holds more than one tensor of it beyond what the layout writer keeps
(one TP shard). Exporting streams our full tensors into safetensors shards of at most
``max_shard_bytes``.

Tensor mapping of the three registered families (:mod:`megatron_qsparse.convert.families`, one
adapter each, looked up by ``model_type``; our layouts are documented in
:mod:`megatron_qsparse.model.transformer`):

==========================================  ===============================================
ours                                        Hugging Face
==========================================  ===============================================
``embedding.weight``                        ``model.embed_tokens.weight`` (+ zero padding rows)
``layers.i.input_norm.weight``              ``model.layers.i.input_layernorm.weight``
``layers.i.attention.qkv.{weight,bias}``    ``cat(q_proj, k_proj, v_proj)`` (bias: Qwen2)
``layers.i.attention.o.weight``             ``model.layers.i.self_attn.o_proj.weight``
``layers.i.post_attention_norm.weight``     ``model.layers.i.post_attention_layernorm.weight``
``layers.i.mlp.gate_up.weight``             ``cat(gate_proj, up_proj)``
``layers.i.mlp.down.weight``                ``model.layers.i.mlp.down_proj.weight``
``final_norm.weight``                       ``model.norm.weight``
``output_layer.weight`` (untied)            ``lm_head.weight`` (absent when tied)
==========================================  ===============================================

Each family's config mapping and quirks (Qwen2's q/k/v bias, Mistral's sliding window, RoPE,
activations) are in its module under :mod:`megatron_qsparse.convert.families`.

Exported configs carry a ``qsparse`` section with the sparsifier settings the model was trained
with (see README, "Continue-training and fine-tuning Hugging Face models"); importing such a
directory restores them.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import re
import shutil
from typing import Iterator

import torch

from megatron_qsparse.atomic import write_text
from megatron_qsparse.config import Config, ConfigError, ModelConfig, QSparseConfig
from megatron_qsparse.convert.families import FAMILIES, get_family
from megatron_qsparse.convert.families.llama import ACTS  # noqa: F401 (part of this module's API)
from megatron_qsparse.convert.layout import TensorSource

logger = logging.getLogger(__name__)

ARCHITECTURES = {t: f.architecture for t, f in FAMILIES.items()}
QSPARSE_KEY = "qsparse"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


# ---------------------------------------------------------------------------------------------
# configuration


def read_hf_config(hf_dir: str) -> dict:
    path = os.path.join(hf_dir, "config.json")
    if not os.path.isfile(path):
        raise ConfigError(f"--hf-dir: {hf_dir} has no config.json; give a Hugging Face model "
                          "directory (config.json + *.safetensors)")
    with open(path) as fh:
        return json.load(fh)


def model_config_from_hf(hf: dict, seq_length: int | None = None) -> ModelConfig:
    """Our model shape for a Hugging Face config (raises on what we cannot represent)."""
    mt = hf.get("model_type")
    family = get_family(mt)
    if family is None:
        raise ConfigError(f"--hf-dir: model_type {mt!r} is not supported; use one of "
                          f"{sorted(FAMILIES)}")
    return family.model_config(hf, seq_length)


def qsparse_config_from_hf(hf: dict) -> QSparseConfig:
    """The sparsifier settings an exported config recorded; dense (mode none) otherwise."""
    rec = hf.get(QSPARSE_KEY)
    if not rec:
        return QSparseConfig(mode="none")
    known = {f.name for f in dataclasses.fields(QSparseConfig)}
    return QSparseConfig(**{k: v for k, v in rec.items() if k in known})


def hf_config_from_ours(cfg: Config, model_type: str, base: dict | None = None,
                        dtype: str = "float32") -> dict:
    """A Hugging Face ``config.json`` for our model (``base``: the imported original, whose other
    fields such as token ids are kept)."""
    family = get_family(model_type)
    if family is None:
        raise ConfigError(f"--model-type: {model_type!r} is not one of {sorted(FAMILIES)}")
    out = family.hf_config(cfg, base, dtype)
    out[QSPARSE_KEY] = dict(dataclasses.asdict(cfg.qsparse), format="megatron-qsparse/1")
    return out


# ---------------------------------------------------------------------------------------------
# lazy reading of a Hugging Face directory


class SafetensorsDir:
    """Tensor name -> file of a safetensors checkpoint directory; reads one tensor per call."""

    def __init__(self, hf_dir: str):
        from safetensors import safe_open

        self.dir = hf_dir
        self._open = safe_open
        index = os.path.join(hf_dir, "model.safetensors.index.json")
        single = os.path.join(hf_dir, "model.safetensors")
        if os.path.isfile(index):
            with open(index) as fh:
                self.where = dict(json.load(fh)["weight_map"])
            for f in set(self.where.values()):
                if os.path.basename(f) != f or not f.endswith(".safetensors"):
                    raise ConfigError(f"--hf-dir: {index} names {f!r}, not a .safetensors file "
                                      "of the directory; fix the index")
            for f in sorted(set(self.where.values())):
                if not os.path.isfile(os.path.join(hf_dir, f)):
                    raise ConfigError(f"--hf-dir: {index} names {f}, which is not in "
                                      f"{hf_dir}; download every shard the index lists")
                self._check_readable(f)
        elif os.path.isfile(single):
            with self._opened("model.safetensors") as f:
                self.where = {k: "model.safetensors" for k in f.keys()}
        else:
            raise ConfigError(f"--hf-dir: {hf_dir} has no model.safetensors(.index.json); "
                              "convert .bin weights to safetensors first (loading pickles is "
                              "not safe)")

    def _opened(self, name: str):
        """``safe_open`` of one file; a truncated or corrupt file is a one-line ConfigError."""
        path = os.path.join(self.dir, name)
        try:
            return self._open(path, "pt")
        except Exception as e:  # noqa: BLE001 - SafetensorError, OSError: one clear line
            raise ConfigError(f"--hf-dir: {path} is not a readable safetensors file "
                              f"({_first_line(e)}); it is truncated or corrupt, download it "
                              "again") from None

    def _check_readable(self, name: str) -> None:
        with self._opened(name):
            pass

    def __contains__(self, name: str) -> bool:
        return name in self.where

    def get(self, name: str) -> torch.Tensor:
        if name not in self.where:
            raise ConfigError(f"--hf-dir: tensor {name!r} is missing from {self.dir}")
        with self._opened(self.where[name]) as f:
            try:
                return f.get_tensor(name)
            except Exception as e:  # noqa: BLE001 - a file cut short after its header
                raise ConfigError(f"--hf-dir: cannot read tensor {name!r} from "
                                  f"{os.path.join(self.dir, self.where[name])} "
                                  f"({_first_line(e)}); the file is truncated or corrupt, "
                                  "download it again") from None


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return (text.splitlines()[0] if text else type(e).__name__)[:200]


def name_map(m: ModelConfig, model_type: str = "llama") -> dict[str, list[str]]:
    """Our parameter name -> the Hugging Face tensors it is the row-concatenation of (the
    registered families share LLaMA's tensor names, hence the default)."""
    return FAMILIES[model_type].name_map(m)


def hf_source(hf_dir: str, m: ModelConfig, padded_vocab: int,
              dtype: torch.dtype | None = None, model_type: str = "llama") -> TensorSource:
    """A re-iterable source of our full tensors read lazily from ``hf_dir`` (vocabulary rows
    zero-padded to ``padded_vocab``; cast to ``dtype`` when given)."""
    files = SafetensorsDir(hf_dir)
    mapping = name_map(m, model_type)
    for theirs in mapping.values():
        for t in theirs:
            if t not in files:
                raise ConfigError(f"--hf-dir: tensor {t!r} is missing from {hf_dir}; the "
                                  "checkpoint does not match its config.json")

    def gen():
        for ours, theirs in mapping.items():
            parts = [files.get(t) for t in theirs]
            t = parts[0] if len(parts) == 1 else torch.cat(parts, dim=0)
            del parts
            if ours.startswith(("embedding.", "output_layer.")) and t.shape[0] < padded_vocab:
                t = torch.cat([t, t.new_zeros(padded_vocab - t.shape[0], *t.shape[1:])])
            yield ours, (t if dtype is None else t.to(dtype))
    return gen


def to_hf_tensors(source: TensorSource, m: ModelConfig,
                  model_type: str = "llama") -> Iterator[tuple[str, torch.Tensor]]:
    """Our full tensors -> Hugging Face tensors (fused ones split, vocabulary padding stripped)."""
    mapping = name_map(m, model_type)
    hd, nq, nkv = m.resolved_kv_channels(), m.num_attention_heads, m.resolved_query_groups()
    ffn = m.resolved_ffn_hidden_size()
    for ours, t in source():
        theirs = mapping.get(ours)
        if theirs is None:
            raise ConfigError(f"export: our tensor {ours!r} has no Hugging Face counterpart")
        if ours.startswith(("embedding.", "output_layer.")):
            t = t[:m.vocab_size]
        if ".qkv." in ours:
            parts = t.split([nq * hd, nkv * hd, nkv * hd], dim=0)
        elif ".gate_up." in ours:
            parts = t.split([ffn, ffn], dim=0)
        else:
            parts = (t,)
        for name, part in zip(theirs, parts):
            yield name, part.contiguous()


# ---------------------------------------------------------------------------------------------
# writing a Hugging Face directory


def parse_size(text: str) -> int:
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMG]?B?)\s*", str(text).upper())
    if not m:
        raise ConfigError(f"--max-shard-size: {text!r} is not a size; write e.g. 5GB or 500MB")
    mult = {"": 1, "B": 1, "K": 1e3, "KB": 1e3, "M": 1e6, "MB": 1e6, "G": 1e9, "GB": 1e9}[m[2]]
    return int(float(m[1]) * mult)


def write_hf_dir(out_dir: str, hf_config: dict, tensors: Iterator[tuple[str, torch.Tensor]],
                 *, max_shard_bytes: int = 5 * 10**9, dtype: torch.dtype | None = None,
                 tokenizer_model: str | None = None) -> None:
    """Write a Hugging Face model directory atomically (into a hidden sibling, then renamed).

    Tensors are gathered into safetensors shards of at most ``max_shard_bytes`` (one file, or
    ``model-0000i-of-0000n.safetensors`` with ``model.safetensors.index.json``); peak memory is
    about one shard. ``tokenizer_model`` (a SentencePiece file) is copied as ``tokenizer.model``
    (with a ``LlamaTokenizer`` config); a tokenizer directory's files are copied as they are.
    """
    from safetensors.torch import save_file

    if os.path.exists(out_dir) and os.listdir(out_dir):
        raise ConfigError(f"--save: {out_dir} exists and is not empty; choose a new directory")
    parent = os.path.dirname(os.path.abspath(out_dir))
    os.makedirs(parent, exist_ok=True)
    tmp = os.path.join(parent, ".tmp-" + os.path.basename(os.path.abspath(out_dir)))
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    try:
        shards, current, size, total = [], {}, 0, 0

        def flush():
            nonlocal current, size
            if current:
                name = f"shard-{len(shards):05d}.safetensors"
                save_file(current, os.path.join(tmp, name), metadata={"format": "pt"})
                shards.append((name, list(current)))
                current, size = {}, 0

        for name, t in tensors:
            if dtype is not None:
                t = t.to(dtype)
            nbytes = t.numel() * t.element_size()
            if current and size + nbytes > max_shard_bytes:
                flush()
            current[name] = t.detach().clone()
            size += nbytes
            total += nbytes
        flush()
        if len(shards) == 1:
            os.replace(os.path.join(tmp, shards[0][0]), os.path.join(tmp, "model.safetensors"))
        else:
            weight_map = {}
            n = len(shards)
            for i, (name, keys) in enumerate(shards):
                final = f"model-{i + 1:05d}-of-{n:05d}.safetensors"
                os.replace(os.path.join(tmp, name), os.path.join(tmp, final))
                weight_map.update({k: final for k in keys})
            write_text(os.path.join(tmp, "model.safetensors.index.json"), json.dumps(
                {"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
        write_text(os.path.join(tmp, "config.json"), json.dumps(hf_config, indent=2,
                                                                sort_keys=True) + "\n")
        if tokenizer_model:
            if os.path.isdir(tokenizer_model):  # a transformers tokenizer directory
                for f in sorted(os.listdir(tokenizer_model)):
                    if f.startswith(("tokenizer", "special_tokens_map")) or f in (
                            "vocab.json", "merges.txt"):
                        shutil.copyfile(os.path.join(tokenizer_model, f), os.path.join(tmp, f))
            elif os.path.isfile(tokenizer_model):
                shutil.copyfile(tokenizer_model, os.path.join(tmp, "tokenizer.model"))
                write_text(os.path.join(tmp, "tokenizer_config.json"), json.dumps(
                    {"tokenizer_class": "LlamaTokenizer", "add_bos_token": True,
                     "add_eos_token": False}, indent=2) + "\n")
            else:
                logger.warning("tokenizer model %s not found: not copied", tokenizer_model)
        if os.path.isdir(out_dir):
            os.rmdir(out_dir)  # empty (checked above)
        os.replace(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


__all__ = ["ARCHITECTURES", "DTYPES", "FAMILIES", "SafetensorsDir", "hf_config_from_ours",
           "hf_source",
           "model_config_from_hf", "name_map", "parse_size", "qsparse_config_from_hf",
           "read_hf_config", "to_hf_tensors", "write_hf_dir"]
