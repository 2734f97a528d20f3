"""Hugging Face LLaMA / Mistral / Qwen2 checkpoints <-> our model (state-dict adapter).

A Hugging Face directory (``config.json`` + ``model.safetensors`` or shards with
``model.safetensors.index.json``) is read lazily: :func:`hf_source` opens each safetensors file
with ``safe_open`` and reads one tensor (or the 2-3 parts of one fused tensor) at a time, so
importing a 7B model never holds more than one tensor of it beyond what the layout writer keeps
(one TP shard). Exporting streams our full tensors into safetensors shards of at most
``max_shard_bytes``.

Architecture mapping (all three are pre-norm RMSNorm decoders with RoPE and grouped-query
attention; our layouts are documented in :mod:`megatron_qsparse.model.transformer`):

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

RoPE: both use ``rotate_half`` (feature ``i`` paired with ``i + hd/2``), so q/k need no
permutation. ``hidden_act`` ``silu`` is our ``swiglu`` FFN; ``relu2`` (``up · ReLU(gate)²``) is
our ``relu2_glu``, so our from-scratch models export too. Mistral's sliding-window attention is not
implemented: the imported model gets ``max_position_embeddings = sliding_window`` so that no run
can use sequences where the window would matter (``--seq-length`` above it is rejected).

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
from megatron_qsparse.convert.layout import TensorSource

logger = logging.getLogger(__name__)

ARCHITECTURES = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM",
                 "qwen2": "Qwen2ForCausalLM"}
ACTS = {"silu": "swiglu", "swish": "swiglu", "relu2": "relu2_glu"}
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


def _rope_theta(hf: dict) -> int:
    params = hf.get("rope_parameters") or {}
    scaling = hf.get("rope_scaling") or {}
    rope_type = params.get("rope_type") or scaling.get("rope_type") or scaling.get("type")
    if rope_type not in (None, "default"):
        raise ConfigError(f"--hf-dir: RoPE scaling {rope_type!r} is not implemented; only the "
                          "default rotary embedding is supported")
    theta = params.get("rope_theta", hf.get("rope_theta", 10000.0))
    if float(theta) != int(theta):
        raise ConfigError(f"--hf-dir: rope_theta {theta} is not an integer; not supported")
    return int(theta)


def model_config_from_hf(hf: dict, seq_length: int | None = None) -> ModelConfig:
    """Our model shape for a Hugging Face config (raises on what we cannot represent)."""
    mt = hf.get("model_type")
    if mt not in ARCHITECTURES:
        raise ConfigError(f"--hf-dir: model_type {mt!r} is not supported; use one of "
                          f"{sorted(ARCHITECTURES)}")
    act = hf.get("hidden_act", "silu")
    if act not in ACTS:
        raise ConfigError(f"--hf-dir: hidden_act {act!r} is not supported; use silu or relu2")
    if hf.get("attention_bias") or hf.get("mlp_bias"):
        raise ConfigError("--hf-dir: attention_bias/mlp_bias on every projection is not "
                          "supported (only Qwen2's q/k/v bias is)")
    heads = hf["num_attention_heads"]
    head_dim = hf.get("head_dim") or hf["hidden_size"] // heads
    max_pos = int(hf.get("max_position_embeddings") or 4096)
    window = hf.get("sliding_window") if (mt == "mistral" or hf.get("use_sliding_window")) \
        else None
    if window is not None and window < max_pos:
        logger.warning("sliding_window %d < max_position_embeddings %d: sliding-window attention "
                       "is not implemented, so the imported model is limited to %d positions "
                       "(where full causal attention equals it)", window, max_pos, window)
        max_pos = int(window)
    seq = int(seq_length or min(max_pos, 4096))
    if seq > max_pos:
        raise ConfigError(f"--seq-length: {seq} is longer than the model's {max_pos} positions; "
                          "use a shorter sequence")
    return ModelConfig(
        num_layers=hf["num_hidden_layers"], hidden_size=hf["hidden_size"],
        ffn_hidden_size=hf["intermediate_size"], num_attention_heads=heads,
        num_query_groups=hf.get("num_key_value_heads") or heads, kv_channels=head_dim,
        seq_length=seq, max_position_embeddings=max_pos, ffn_type=ACTS[act],
        normalization="RMSNorm", norm_epsilon=float(hf.get("rms_norm_eps", 1e-6)),
        rotary_base=_rope_theta(hf), add_bias_linear=False, add_qkv_bias=mt == "qwen2",
        untie_embeddings_and_output_weights=not hf.get("tie_word_embeddings", False),
        vocab_size=hf["vocab_size"], init_method_std=float(hf.get("initializer_range", 0.02)))


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
    m = cfg.model
    if model_type not in ARCHITECTURES:
        raise ConfigError(f"--model-type: {model_type!r} is not one of {sorted(ARCHITECTURES)}")
    problems = []
    if m.normalization != "RMSNorm":
        problems.append("--normalization LayerNorm")
    if m.add_bias_linear:
        problems.append("--add-bias-linear")
    if m.add_qkv_bias and model_type != "qwen2":
        problems.append("--add-qkv-bias (only qwen2 has it)")
    if model_type == "qwen2" and not m.add_qkv_bias:
        problems.append("no q/k/v bias (qwen2 has one; export as llama)")
    if cfg.qsparse.bitnet:
        problems.append("--bitnet (ternary weights need our forward)")
    if problems:
        raise ConfigError(f"export: {', '.join(problems)} cannot be expressed as a Hugging Face "
                          f"{model_type} model; run such checkpoints with megatron-qsparse")
    act = {v: k for k, v in ACTS.items() if k != "swish"}[m.ffn_type]
    out = dict(base or {})
    for k in ("rope_scaling", "_name_or_path", "auto_map"):
        out.pop(k, None)
    if not base or base.get("model_type") != model_type:
        out.pop("sliding_window", None)
        out.pop("use_sliding_window", None)
        out.pop("layer_types", None)
    out.update({
        "architectures": [ARCHITECTURES[model_type]], "model_type": model_type,
        "hidden_size": m.hidden_size, "intermediate_size": m.resolved_ffn_hidden_size(),
        "num_hidden_layers": m.num_layers, "num_attention_heads": m.num_attention_heads,
        "num_key_value_heads": m.resolved_query_groups(), "head_dim": m.resolved_kv_channels(),
        "hidden_act": act, "rms_norm_eps": m.norm_epsilon, "vocab_size": m.vocab_size,
        "tie_word_embeddings": not m.untie_embeddings_and_output_weights,
        "rope_parameters": {"rope_theta": float(m.rotary_base), "rope_type": "default"},
        "rope_theta": float(m.rotary_base), "dtype": dtype,
        "attention_dropout": 0.0, "initializer_range": m.init_method_std,
    })
    if not base:
        out["max_position_embeddings"] = m.max_position_embeddings or m.seq_length
    if model_type == "mistral":
        out.setdefault("sliding_window", None)
    if model_type == "llama":
        out.update(attention_bias=False, mlp_bias=False)
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
        elif os.path.isfile(single):
            with safe_open(single, "pt") as f:
                self.where = {k: "model.safetensors" for k in f.keys()}
        else:
            raise ConfigError(f"--hf-dir: {hf_dir} has no model.safetensors(.index.json); "
                              "convert .bin weights to safetensors first (loading pickles is "
                              "not safe)")

    def __contains__(self, name: str) -> bool:
        return name in self.where

    def get(self, name: str) -> torch.Tensor:
        if name not in self.where:
            raise ConfigError(f"--hf-dir: tensor {name!r} is missing from {self.dir}")
        with self._open(os.path.join(self.dir, self.where[name]), "pt") as f:
            return f.get_tensor(name)


def _layer_names(i: int) -> dict[str, list[str]]:
    p = f"model.layers.{i}."
    return {
        f"layers.{i}.input_norm.weight": [p + "input_layernorm.weight"],
        f"layers.{i}.attention.qkv.weight": [p + f"self_attn.{x}_proj.weight" for x in "qkv"],
        f"layers.{i}.attention.qkv.bias": [p + f"self_attn.{x}_proj.bias" for x in "qkv"],
        f"layers.{i}.attention.o.weight": [p + "self_attn.o_proj.weight"],
        f"layers.{i}.post_attention_norm.weight": [p + "post_attention_layernorm.weight"],
        f"layers.{i}.mlp.gate_up.weight": [p + "mlp.gate_proj.weight", p + "mlp.up_proj.weight"],
        f"layers.{i}.mlp.down.weight": [p + "mlp.down_proj.weight"],
    }


def name_map(m: ModelConfig) -> dict[str, list[str]]:
    """Our parameter name -> the Hugging Face tensors it is the row-concatenation of."""
    out = {"embedding.weight": ["model.embed_tokens.weight"]}
    for i in range(m.num_layers):
        for ours, theirs in _layer_names(i).items():
            if ours.endswith("qkv.bias") and not m.add_qkv_bias:
                continue
            out[ours] = theirs
    out["final_norm.weight"] = ["model.norm.weight"]
    if m.untie_embeddings_and_output_weights:
        out["output_layer.weight"] = ["lm_head.weight"]
    return out


def hf_source(hf_dir: str, m: ModelConfig, padded_vocab: int,
              dtype: torch.dtype | None = None) -> TensorSource:
    """A re-iterable source of our full tensors read lazily from ``hf_dir`` (vocabulary rows
    zero-padded to ``padded_vocab``; cast to ``dtype`` when given)."""
    files = SafetensorsDir(hf_dir)
    mapping = name_map(m)
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


def to_hf_tensors(source: TensorSource, m: ModelConfig) -> Iterator[tuple[str, torch.Tensor]]:
    """Our full tensors -> Hugging Face tensors (fused ones split, vocabulary padding stripped)."""
    mapping = name_map(m)
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


__all__ = ["ARCHITECTURES", "DTYPES", "SafetensorsDir", "hf_config_from_ours", "hf_source",
           "model_config_from_hf", "name_map", "parse_size", "qsparse_config_from_hf",
           "read_hf_config", "to_hf_tensors", "write_hf_dir"]
