"""LLaMA (``LlamaForCausalLM``): the adapter the other LLaMA-style families derive from.

All three families are pre-norm RMSNorm decoders with RoPE and grouped-query attention, and
their tensors have the same names; this module holds that shared mapping, and the subclasses in
:mod:`.mistral` and :mod:`.qwen2` override only their quirks. RoPE: ``rotate_half`` (feature
``i`` paired with ``i + hd/2``) as in our model, so q/k need no permutation. ``hidden_act``
``silu`` is our ``swiglu`` FFN; ``relu2`` (``up · ReLU(gate)²``) is our ``relu2_glu``, so our
from-scratch models export too.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Mapping

from megatron_qsparse.config import Config, ConfigError, ModelConfig

logger = logging.getLogger(__name__)

ACTS = {"silu": "swiglu", "swish": "swiglu", "relu2": "relu2_glu"}
PROJECTION_KINDS = MappingProxyType({
    "q_proj": "qkv", "k_proj": "qkv", "v_proj": "qkv", "o_proj": "o",
    "gate_proj": "gate_up", "up_proj": "gate_up", "down_proj": "down"})


def rope_theta(hf: dict) -> int:
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


@dataclass(frozen=True)
class LlamaFamily:
    """The LLaMA-style adapter (see :class:`~megatron_qsparse.convert.families.HFFamily`)."""

    model_type: str = "llama"
    architecture: str = "LlamaForCausalLM"
    qkv_bias: bool = False
    projection_kinds: Mapping[str, str] = field(default_factory=lambda: PROJECTION_KINDS)

    # ---- quirks (overridden by the subclasses)

    def sliding_window(self, hf: dict) -> int | None:
        """The attention window ``config.json`` asks for; None: full causal attention."""
        return hf.get("sliding_window") if hf.get("use_sliding_window") else None

    def _export_fields(self, out: dict) -> None:
        """The family's own fields of an exported ``config.json``."""
        out.update(attention_bias=False, mlp_bias=False)

    # ---- config: Hugging Face -> ours

    def model_config(self, hf: dict, seq_length: int | None = None) -> ModelConfig:
        act = hf.get("hidden_act", "silu")
        if act not in ACTS:
            raise ConfigError(f"--hf-dir: hidden_act {act!r} is not supported; use silu or relu2")
        if hf.get("attention_bias") or hf.get("mlp_bias"):
            raise ConfigError("--hf-dir: attention_bias/mlp_bias on every projection is not "
                              "supported (only Qwen2's q/k/v bias is)")
        heads = hf["num_attention_heads"]
        head_dim = hf.get("head_dim") or hf["hidden_size"] // heads
        max_pos = int(hf.get("max_position_embeddings") or 4096)
        window = self.sliding_window(hf)
        if window is not None and window < max_pos:
            logger.warning("sliding_window %d < max_position_embeddings %d: sliding-window "
                           "attention is not implemented, so the imported model is limited to "
                           "%d positions (where full causal attention equals it)",
                           window, max_pos, window)
            max_pos = int(window)
        seq = int(seq_length or min(max_pos, 4096))
        if seq > max_pos:
            raise ConfigError(f"--seq-length: {seq} is longer than the model's {max_pos} "
                              "positions; use a shorter sequence")
        return ModelConfig(
            num_layers=hf["num_hidden_layers"], hidden_size=hf["hidden_size"],
            ffn_hidden_size=hf["intermediate_size"], num_attention_heads=heads,
            num_query_groups=hf.get("num_key_value_heads") or heads, kv_channels=head_dim,
            seq_length=seq, max_position_embeddings=max_pos, ffn_type=ACTS[act],
            normalization="RMSNorm", norm_epsilon=float(hf.get("rms_norm_eps", 1e-6)),
            rotary_base=rope_theta(hf), add_bias_linear=False, add_qkv_bias=self.qkv_bias,
            untie_embeddings_and_output_weights=not hf.get("tie_word_embeddings", False),
            vocab_size=hf["vocab_size"], init_method_std=float(hf.get("initializer_range", 0.02)))

    # ---- config: ours -> Hugging Face

    def hf_config(self, cfg: Config, base: dict | None = None, dtype: str = "float32") -> dict:
        m = cfg.model
        problems = []
        if m.normalization != "RMSNorm":
            problems.append("--normalization LayerNorm")
        if m.add_bias_linear:
            problems.append("--add-bias-linear")
        if m.add_qkv_bias and not self.qkv_bias:
            problems.append("--add-qkv-bias (only qwen2 has it)")
        if self.qkv_bias and not m.add_qkv_bias:
            problems.append(f"no q/k/v bias ({self.model_type} has one; export as llama)")
        if cfg.qsparse.bitnet:
            problems.append("--bitnet (ternary weights need our forward)")
        if problems:
            raise ConfigError(f"export: {', '.join(problems)} cannot be expressed as a Hugging "
                              f"Face {self.model_type} model; run such checkpoints with "
                              "megatron-qsparse")
        act = {v: k for k, v in ACTS.items() if k != "swish"}[m.ffn_type]
        out = dict(base or {})
        for k in ("rope_scaling", "_name_or_path", "auto_map"):
            out.pop(k, None)
        if not base or base.get("model_type") != self.model_type:
            out.pop("sliding_window", None)
            out.pop("use_sliding_window", None)
            out.pop("layer_types", None)
        out.update({
            "architectures": [self.architecture], "model_type": self.model_type,
            "hidden_size": m.hidden_size, "intermediate_size": m.resolved_ffn_hidden_size(),
            "num_hidden_layers": m.num_layers, "num_attention_heads": m.num_attention_heads,
            "num_key_value_heads": m.resolved_query_groups(),
            "head_dim": m.resolved_kv_channels(), "hidden_act": act,
            "rms_norm_eps": m.norm_epsilon, "vocab_size": m.vocab_size,
            "tie_word_embeddings": not m.untie_embeddings_and_output_weights,
            "rope_parameters": {"rope_theta": float(m.rotary_base), "rope_type": "default"},
            "rope_theta": float(m.rotary_base), "dtype": dtype,
            "attention_dropout": 0.0, "initializer_range": m.init_method_std,
        })
        if not base:
            out["max_position_embeddings"] = m.max_position_embeddings or m.seq_length
        self._export_fields(out)
        return out

    # ---- weights

    def name_map(self, m: ModelConfig) -> dict[str, list[str]]:
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


LLAMA = LlamaFamily()
