"""Typed configuration: the single source of truth for every run.

Each field carries its command-line spelling (Megatron-LM's where one exists) and a one-line help
text in ``metadata``; :mod:`megatron_qsparse.arguments` generates the CLI from these dataclasses.
All validation lives here: each section's ``validate()`` method, the cross-section rules and
:func:`validate`, the entry point; every error is one line that names the flag and the fix.
This module imports no other module of the package, so any module can import it.
"""

from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass, field
from typing import Any


class ConfigError(ValueError):
    """An impossible or inconsistent setting. The message names the flag and how to fix it."""


def arg(default: Any, help: str, *, flag: str | None = None, choices: tuple | None = None,
        nargs: str | None = None, aliases: tuple[str, ...] = ()) -> Any:
    """A dataclass field with its CLI metadata.

    ``flag`` overrides the generated spelling (``--field-name``); for a boolean that defaults to
    True the flag turns it off (e.g. ``--no-ste``).
    """
    meta = {"help": help, "flag": flag, "choices": choices, "nargs": nargs, "aliases": aliases}
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda d=default: type(d)(d), metadata=meta)
    return field(default=default, metadata=meta)


PROJECTION_KINDS = ("qkv", "o", "gate_up", "down")
FFN_TYPES = ("relu2_glu", "swiglu")
LR_DECAY_STYLES = ("constant", "linear", "cosine", "WSD")
WSD_DECAY_STYLES = ("linear", "cosine", "exponential", "minus_sqrt")
NORMALIZATIONS = ("RMSNorm", "LayerNorm")
DATA_FORMATS = ("gpt", "sft")
# the per-position tensors of packed sequences, in the order batches and pipeline stages carry them
DOCUMENT_FIELDS = ("position_ids", "segment_ids")
MOE_DROP_POLICIES = ("position", "random", "none")
MOE_NOISY_GATE_POLICIES = ("none", "jitter", "rsample")
# An AdamW step moves each weight by about lr: above this a run diverges at once.
MAX_LR = 1.0


@dataclass
class QSparseConfig:
    """How the input of every linear projection is sparsified (see DESIGN.md, "The method")."""

    mode: str = arg("topk", "Sparsifier on linear inputs (a method registered in "
                    "megatron_qsparse/sparsity/methods/).", flag="--qsparse-mode")
    ratio: float = arg(0.4, "Sparsity ratio S: fraction of input features zeroed (keep "
                       "K = d - floor(S*d)).", flag="--qsparse-ratio")
    qkv_ratio: float | None = arg(None, "Sparsity ratio for the q/k/v projections' input; "
                                  "default: --qsparse-ratio.", flag="--qsparse-qkv-ratio")
    o_ratio: float | None = arg(None, "Sparsity ratio for the attention output projection's input; "
                                "default: --qsparse-ratio.", flag="--qsparse-o-ratio")
    gate_up_ratio: float | None = arg(None, "Sparsity ratio for the gate/up projections' input; "
                                      "default: --qsparse-ratio.", flag="--qsparse-gate-up-ratio")
    down_ratio: float | None = arg(None, "Sparsity ratio for the down projection's input; "
                                   "default: --qsparse-ratio.", flag="--qsparse-down-ratio")
    block: str = arg("2:4", "N:M pattern of --qsparse-mode block: keep N of every M consecutive "
                     "features.", flag="--qsparse-block")
    ste: bool = arg(True, "Ablation: disable the straight-through estimator, so only kept "
                    "positions receive gradient.", flag="--no-ste")
    rescale: str = arg("none", "Rescale kept entries so the sparse vector keeps the dense L2 norm.",
                       flag="--qsparse-rescale", choices=("none", "l2"))
    quantize_activations: bool = arg(
        False, "8-bit per-token absmax fake quantization of the input before top-K.",
        flag="--qsparse-quantize-activations")
    bitnet: bool = arg(False, "BitNet b1.58: ternary {-1,0,+1}*mean|W| weights and int8 "
                       "activations (STE).", flag="--bitnet")
    warmup_iters: int = arg(0, "Ramp the sparsity ratio linearly from 0 to its target over this "
                            "many iterations (continue-training).", flag="--qsparse-warmup-iters")
    calibration: dict | None = arg(
        None, "JSON file of per-projection values a method was calibrated with (e.g. the "
        "thresholds of --qsparse-mode threshold, written by tools/calibrate_thresholds.py into "
        "the checkpoint it saves).", flag="--qsparse-calibration")

    def ratio_for(self, kind: str) -> float:
        """The target sparsity ratio of one projection kind (``qkv``, ``o``, ``gate_up``, ``down``)."""
        if kind not in PROJECTION_KINDS:
            raise KeyError(f"unknown projection kind {kind!r}; expected one of {PROJECTION_KINDS}")
        override = getattr(self, f"{kind}_ratio")
        return self.ratio if override is None else override

    def block_nm(self) -> tuple[int, int]:
        n, m = (int(v) for v in self.block.split(":"))
        return n, m

    def validate(self) -> None:
        """Check the ratios and the warm-up (each mode's own rules are its method's, in
        ``sparsity/methods/``)."""
        for kind in (None,) + PROJECTION_KINDS:
            name = "ratio" if kind is None else f"{kind}_ratio"
            v = getattr(self, name)
            if v is not None and not 0.0 <= v < 1.0:
                raise flag_error("qsparse", name, f"sparsity ratio {v} is outside [0, 1)",
                           "give the fraction of features to zero, e.g. 0.4")
        if self.warmup_iters < 0:
            raise flag_error("qsparse", "warmup_iters", f"got {self.warmup_iters}",
                       "use 0 or more iterations")


@dataclass
class ModelConfig:
    """Shape of the LLaMA-style decoder."""

    num_layers: int = arg(2, "Number of transformer blocks.")
    hidden_size: int = arg(128, "Model (residual stream) width.")
    ffn_hidden_size: int | None = arg(
        None, "FFN inner width; default: 8/3 x hidden rounded up to a multiple of 64 (GLU sizing).")
    num_attention_heads: int = arg(4, "Number of query heads.")
    num_query_groups: int | None = arg(
        None, "Number of key/value heads for grouped-query attention; default: one per query head.")
    kv_channels: int | None = arg(None, "Per-head width; default: hidden-size / num-attention-heads.")
    seq_length: int = arg(256, "Training sequence length in tokens.")
    max_position_embeddings: int | None = arg(
        None, "Longest sequence the rotary tables are built for; default: --seq-length.")
    ffn_type: str = arg("relu2_glu", "FFN activation: squared-ReLU GLU (from scratch) or SwiGLU "
                        "(continue-training LLaMA/Mistral/Qwen).", choices=FFN_TYPES)
    normalization: str = arg("RMSNorm", "Normalization layer.", choices=NORMALIZATIONS)
    norm_epsilon: float = arg(1e-5, "Epsilon of the normalization layers.")
    rotary_base: int = arg(10000, "Base (theta) of the rotary position embedding.")
    add_bias_linear: bool = arg(False, "Give every linear projection a bias (LLaMA has none).")
    untie_embeddings_and_output_weights: bool = arg(
        False, "Use a separate output (LM head) matrix instead of the transposed input embedding.")
    init_method_std: float = arg(0.02, "Std of the normal initialisation of weights.")
    hidden_dropout: float = arg(0.0, "Dropout on the residual branches.")
    attention_dropout: float = arg(0.0, "Dropout on the attention probabilities.")
    make_vocab_size_divisible_by: int = arg(
        128, "Pad the vocabulary to a multiple of this (times the tensor-parallel size).")
    vocab_size: int | None = arg(
        None, "Vocabulary size before padding; default: taken from the tokenizer.")
    recompute_granularity: str | None = arg(
        None, "Activation recomputation in the backward pass: full (every transformer block) "
        "or selective (the attention core only).", choices=("full", "selective"))
    recompute_activations: bool = arg(
        False, "Shorthand for --recompute-granularity selective (Megatron-LM's flag).")
    add_qkv_bias: bool = arg(
        False, "Give the q/k/v projections a bias (Qwen2), without biases elsewhere.")
    # ---- mixture of experts (model/moe.py); experts are the same sparse MLPs as the dense FFN
    num_experts: int | None = arg(
        None, "Mixture of experts: number of experts per MoE layer (default: dense FFN).")
    moe_router_topk: int = arg(2, "MoE: experts each token is routed to (1 or 2).",
                               choices=(1, 2))
    moe_layer_freq: int = arg(1, "MoE: block i (from 0) has an MoE FFN when this number divides i (1: every block, "
                              "2: blocks 0, 2, 4, ...); the others keep the dense FFN.")
    moe_expert_capacity_factor: float = arg(
        1.0, "MoE: tokens an expert takes per step = factor x k x tokens / experts (at least "
        "--moe-min-capacity); tokens beyond it are dropped (skip the FFN).")
    moe_eval_capacity_factor: float | None = arg(
        None, "MoE: capacity factor in evaluation; default: --moe-expert-capacity-factor.")
    moe_min_capacity: int = arg(4, "MoE: the least capacity of an expert, in tokens.")
    moe_token_drop_policy: str = arg(
        "position", "MoE: which tokens an over-full expert keeps: the first ones (position), "
        "random ones (random, top-1 only) or all (none: no capacity limit).",
        choices=MOE_DROP_POLICIES)
    moe_noisy_gate_policy: str = arg(
        "none", "MoE: router noise in training: jitter (multiplicative input noise) or rsample "
        "(Gumbel noise on the logits, top-1 only).", choices=MOE_NOISY_GATE_POLICIES)
    moe_top2_sampling: bool = arg(
        True, "MoE top-2: take the second expert by largest logit instead of sampling it "
        "(Gumbel noise) in training (evaluation and generation always take it by logit).",
        flag="--no-moe-top2-sampling")
    moe_aux_loss_coeff: float = arg(
        0.01, "MoE: weight of the load-balancing auxiliary loss added to the training loss.")
    moe_z_loss_coeff: float = arg(
        0.0, "MoE: weight of the router z-loss mean(logsumexp(logits)^2) (0: off).")
    moe_router_sparsify_input: bool = arg(
        False, "MoE: feed the router the top-K sparsified input (the gate/up ratio) instead of "
        "the dense one.")

    @property
    def qsparse(self) -> QSparseConfig:
        """The sparsity of this model's projections. Inside a :class:`Config` it is the run's
        ``Config.qsparse`` (the same object: the model builders take the model config alone);
        a ModelConfig on its own carries the defaults until :meth:`with_sparsity` or an
        assignment sets it. Not a dataclass field: the ``qsparse`` section stays the one source
        of the flags and of the saved configuration."""
        q = self.__dict__.get("_qsparse")
        if q is None:
            q = self.__dict__["_qsparse"] = QSparseConfig()
        return q

    @qsparse.setter
    def qsparse(self, q: QSparseConfig) -> None:
        self.__dict__["_qsparse"] = q

    def with_sparsity(self, q: QSparseConfig) -> "ModelConfig":
        """A copy of this shape whose projections are sparsified as ``q`` says."""
        m = dataclasses.replace(self)
        m.qsparse = q
        return m

    def resolved_recompute(self) -> str | None:
        """``full``, ``selective`` or None (no recomputation)."""
        if self.recompute_granularity is not None:
            return self.recompute_granularity
        return "selective" if self.recompute_activations else None

    def resolved_ffn_hidden_size(self) -> int:
        if self.ffn_hidden_size is not None:
            return self.ffn_hidden_size
        return int(math.ceil(8 * self.hidden_size / 3 / 64) * 64)

    def resolved_kv_channels(self) -> int:
        return self.kv_channels or self.hidden_size // self.num_attention_heads

    def resolved_query_groups(self) -> int:
        return self.num_query_groups or self.num_attention_heads

    def validate(self) -> None:
        """Check the model's own settings (its tensor-parallel split: :func:`validate`)."""
        _positive("model", self, ("num_layers", "hidden_size", "ffn_hidden_size",
                                  "num_attention_heads", "num_query_groups", "kv_channels",
                                  "seq_length", "max_position_embeddings",
                                  "make_vocab_size_divisible_by", "vocab_size", "rotary_base"))
        if self.kv_channels is None and self.hidden_size % self.num_attention_heads:
            raise flag_error("model", "num_attention_heads",
                       f"hidden size {self.hidden_size} is not divisible by "
                       f"{self.num_attention_heads} heads",
                       "pick a head count that divides --hidden-size or set --kv-channels")
        if self.resolved_kv_channels() % 2:
            raise flag_error("model", "kv_channels", f"head width {self.resolved_kv_channels()} is odd",
                       "rotary embeddings need an even head width")
        if self.num_attention_heads % self.resolved_query_groups():
            raise flag_error("model", "num_query_groups",
                       f"{self.num_attention_heads} heads are not divisible into "
                       f"{self.resolved_query_groups()} groups",
                       "use a divisor of --num-attention-heads")
        if (self.max_position_embeddings is not None
                and self.max_position_embeddings < self.seq_length):
            raise flag_error("model", "max_position_embeddings",
                       f"{self.max_position_embeddings} is shorter than --seq-length "
                       f"{self.seq_length}", "raise it or leave it unset")
        if self.norm_epsilon <= 0:
            raise flag_error("model", "norm_epsilon", f"got {self.norm_epsilon}",
                       "use a small positive number")
        if self.init_method_std <= 0:
            raise flag_error("model", "init_method_std", f"got {self.init_method_std}", "use e.g. 0.02")
        for n in ("hidden_dropout", "attention_dropout"):
            v = getattr(self, n)
            if not 0.0 <= v < 1.0:
                raise flag_error("model", n, f"got {v}", "use a probability in [0, 1)")
        if self.recompute_activations and self.recompute_granularity not in (None, "selective"):
            raise flag_error("model", "recompute_activations",
                       f"asks for selective recomputation but --recompute-granularity is "
                       f"{self.recompute_granularity}", "pass only one of the two flags")
        if self.num_experts is not None:
            self._validate_moe()

    def _validate_moe(self) -> None:
        """The MoE settings of a model with experts (the parallel layout is checked elsewhere)."""
        E, k = self.num_experts, self.moe_router_topk
        if E < 2:
            raise flag_error("model", "num_experts", f"got {E}", "use at least 2 experts (or leave it "
                       "unset for a dense FFN)")
        if k > E:
            raise flag_error("model", "moe_router_topk", f"top-{k} of {E} experts",
                       "use k <= --num-experts")
        if self.moe_layer_freq < 1:
            raise flag_error("model", "moe_layer_freq", f"got {self.moe_layer_freq}",
                       "use a positive integer")
        for n in ("moe_expert_capacity_factor", "moe_eval_capacity_factor"):
            v = getattr(self, n)
            if v is not None and v <= 0:
                raise flag_error("model", n, f"got {v}", "use a positive factor, e.g. 1.25")
        if self.moe_min_capacity < 0:
            raise flag_error("model", "moe_min_capacity", f"got {self.moe_min_capacity}",
                       "use 0 or more")
        for n in ("moe_aux_loss_coeff", "moe_z_loss_coeff"):
            if getattr(self, n) < 0:
                raise flag_error("model", n, f"got {getattr(self, n)}",
                           "use 0 (off) or a positive weight")
        if k == 2 and self.moe_token_drop_policy == "random":
            raise flag_error("model", "moe_token_drop_policy", "random token selection is top-1 only "
                       "(DeepSpeed's top-2 gate keeps tokens by position)",
                       "use position or none, or --moe-router-topk 1")
        if k == 2 and self.moe_noisy_gate_policy == "rsample":
            raise flag_error("model", "moe_noisy_gate_policy", "rsample is top-1 only",
                       "use jitter or none, or --moe-router-topk 1")
        if self.resolved_recompute() == "full":
            raise flag_error("model", "recompute_granularity", "full recomputation re-runs the routers "
                       "without gradient for their auxiliary losses", "use selective "
                       "recomputation or none with --num-experts")


@dataclass
class ParallelConfig:
    """Parallel layout and the DeepSpeed engine."""

    tensor_model_parallel_size: int = arg(1, "Tensor-parallel degree.")
    pipeline_model_parallel_size: int = arg(1, "Pipeline-parallel degree (DeepSpeed's pipeline "
                                            "engine; ZeRO stage 0 or 1).")
    pipeline_partition_method: str = arg(
        "uniform", "How transformer blocks are split over pipeline stages: uniform (equal block "
        "counts) or parameters (balanced parameter counts, embedding and head included).",
        choices=("uniform", "parameters"))
    zero_stage: int = arg(0, "DeepSpeed ZeRO stage (0-3).", choices=(0, 1, 2, 3))
    deepspeed: bool = arg(False, "Accepted for Megatron-DeepSpeed compatibility; DeepSpeed is "
                          "always the engine.")
    deepspeed_config: str | None = arg(
        None, "DeepSpeed JSON config; our flags fill what it leaves out.")
    distributed_backend: str = arg("auto", "torch.distributed backend; auto = nccl on GPU, gloo "
                                   "on CPU.", choices=("auto", "gloo", "nccl"))
    distributed_timeout_minutes: int = arg(10, "Timeout of collective operations, in minutes.")
    expert_model_parallel_size: int = arg(
        1, "MoE expert-parallel degree: the experts of a layer are split over this many "
        "data-parallel ranks (tokens travel by all-to-all).")

    def validate(self) -> None:
        """Check the layout's own settings (against the model and world size: :func:`validate`)."""
        _positive("parallel", self, ("tensor_model_parallel_size", "pipeline_model_parallel_size",
                                     "distributed_timeout_minutes"))
        if self.expert_model_parallel_size < 1:
            raise flag_error("parallel", "expert_model_parallel_size",
                       f"got {self.expert_model_parallel_size}", "use a positive integer")
        if self.pipeline_model_parallel_size > 1 and self.zero_stage > 1:
            raise flag_error("parallel", "zero_stage",
                       f"ZeRO-{self.zero_stage} partitions gradients, which DeepSpeed's pipeline "
                       "engine does not support", "use --zero-stage 0 or 1 with "
                       "--pipeline-model-parallel-size > 1")
        if self.deepspeed_config is not None and not os.path.isfile(self.deepspeed_config):
            raise flag_error("parallel", "deepspeed_config", f"file {self.deepspeed_config!r} not found",
                       "give the path of a DeepSpeed JSON config")


@dataclass
class DataConfig:
    """Datasets and tokenizer."""

    data_path: list = arg([], "Preprocessed dataset prefix(es), optionally weighted: "
                          "'PREFIX' or 'W1 PREFIX1 W2 PREFIX2 ...'.", nargs="+")
    split: str = arg("969,30,1", "Train,valid,test proportions of each dataset's documents.")
    tokenizer_type: str = arg("SentencePieceTokenizer", "Tokenizer implementation.",
                              choices=("SentencePieceTokenizer", "GPTSentencePieceTokenizer",
                                       "Llama2Tokenizer", "ByteTokenizer",
                                       "HuggingFaceTokenizer"))
    tokenizer_model: str | None = arg(None, "SentencePiece model file (HuggingFaceTokenizer: a "
                                      "local tokenizer directory).")
    data_cache_path: str | None = arg(
        None, "Directory for cached sample indices; default: next to the data.")
    num_workers: int = arg(0, "DataLoader worker processes.")
    data_format: str = arg("gpt", "gpt: pretraining token streams (tools/preprocess_data.py); "
                           "sft: instruction samples with a loss mask on the response tokens "
                           "(tools/preprocess_sft.py), one sample per sequence, padded (or "
                           "several per sequence with --sft-packing).",
                           choices=DATA_FORMATS)
    sft_packing: bool = arg(
        False, "--data-format sft: pack several samples into each sequence (first-fit, in each "
        "epoch's shuffled order); attention stays inside each sample and its positions restart.")
    reset_position_ids: bool = arg(
        False, "Restart the position ids after every end-of-document token (Megatron-LM).")
    reset_attention_mask: bool = arg(
        False, "No attention across end-of-document tokens: each document attends only to "
        "itself (Megatron-LM).")
    eod_mask_loss: bool = arg(
        False, "No loss where the input token is end-of-document, i.e. on predicting the first "
        "token of the next document (Megatron-LM).")

    def validate(self) -> None:
        """Check what needs no file or parser of the data package.

        The syntax of --data-path and --split and the SFT files are checked by
        :func:`megatron_qsparse.data.validation.validate_data`, which callers run after
        :func:`validate` (``arguments.parse`` and ``training.setup`` do).
        """
        if not self.data_path:
            raise flag_error("data", "data_path", "no dataset given",
                       "preprocess a corpus with tools/preprocess_data.py and pass its prefix")
        if self.tokenizer_type != "ByteTokenizer" and not self.tokenizer_model:
            raise flag_error("data", "tokenizer_model", f"{self.tokenizer_type} needs a model file",
                       "pass --tokenizer-model PATH.model (or --tokenizer-type ByteTokenizer)")
        _positive("data", self, ("num_workers",), allow_zero=True)
        if self.sft_packing and self.data_format != "sft":
            raise flag_error("data", "sft_packing", f"packs instruction samples, not "
                             f"--data-format {self.data_format} streams",
                             "add --data-format sft or drop it")
        if self.data_format == "sft":
            for name in ("reset_position_ids", "reset_attention_mask", "eod_mask_loss"):
                if getattr(self, name):
                    raise flag_error("data", name, "SFT samples carry their own boundaries and "
                                     "loss mask", "drop it (--sft-packing packs samples with "
                                     "attention and positions reset per sample)")

    def document_fields(self) -> tuple[str, ...]:
        """The tensors besides tokens (and loss mask) that this data gives every sequence, in
        :data:`DOCUMENT_FIELDS` order: ``position_ids`` (restarting in every document) and/or
        ``segment_ids`` (the document of each position, for the attention mask)."""
        packed = self.data_format == "sft" and self.sft_packing
        wanted = {"position_ids": packed or self.reset_position_ids,
                  "segment_ids": packed or self.reset_attention_mask}
        return tuple(f for f in DOCUMENT_FIELDS if wanted[f])


@dataclass
class TrainConfig:
    """Optimisation schedule, batch sizes, evaluation and checkpoints."""

    micro_batch_size: int = arg(4, "Sequences per micro-batch per data-parallel rank.")
    global_batch_size: int | None = arg(
        None, "Sequences per optimizer step over all ranks; default: micro-batch x data-parallel "
        "size (no gradient accumulation).")
    train_iters: int = arg(100, "Number of optimizer steps to train for.")
    lr: float = arg(3e-4, "Peak learning rate.")
    min_lr: float = arg(0.0, "Learning rate at the end of the decay.")
    lr_warmup_iters: int = arg(0, "Linear warm-up iterations.")
    lr_decay_style: str = arg("cosine", "Decay after warm-up.", choices=LR_DECAY_STYLES)
    lr_decay_iters: int | None = arg(None, "Iterations over which lr decays; default: --train-iters.")
    lr_wsd_decay_iters: int | None = arg(
        None, "WSD: length of the final decay phase (the rest after warm-up is stable at --lr).")
    lr_wsd_decay_style: str = arg("exponential", "WSD: shape of the final decay phase.",
                                  choices=WSD_DECAY_STYLES)
    weight_decay: float = arg(0.1, "AdamW weight decay (not applied to norms and biases).")
    adam_beta1: float = arg(0.9, "AdamW beta1.")
    adam_beta2: float = arg(0.95, "AdamW beta2.")
    adam_eps: float = arg(1e-8, "AdamW epsilon.")
    clip_grad: float = arg(1.0, "Clip the global gradient norm to this (0 disables).")
    bf16: bool = arg(False, "Train in bfloat16 mixed precision.")
    seed: int = arg(1234, "Random seed for initialisation, data order and dropout.")
    eval_interval: int = arg(1000, "Evaluate on the validation split every this many iterations "
                             "(0: never, not even at the end).")
    eval_iters: int = arg(10, "Global batches per evaluation (the same samples under any "
                          "parallel layout).")
    save: str | None = arg(None, "Directory to save checkpoints to.")
    load: str | None = arg(None, "Directory to resume from (its 'latest' checkpoint).")
    save_interval: int | None = arg(None, "Save a checkpoint every this many iterations.")
    deterministic: bool = arg(False, "Use deterministic algorithms (bitwise reproducible on CPU).")
    keep_last_n_checkpoints: int | None = arg(
        None, "Delete older checkpoints, keeping only the newest N.")
    finetune: bool = arg(False, "With --load: take the weights only (iteration, optimizer, lr "
                         "schedule and data position start anew).")
    exit_interval: int | None = arg(
        None, "Save (with --save) and exit when the iteration is a multiple of this.")
    exit_duration_in_mins: float | None = arg(
        None, "Save (with --save) and exit once the run has lasted this many minutes.")
    exit_signal_handler: bool = arg(
        True, "Do not save and exit on SIGTERM/SIGUSR1 (by default a preempted run saves "
        "after the current iteration).", flag="--no-exit-signal-handler")
    max_consecutive_skipped_iters: int = arg(
        5, "Stop the run after this many consecutive iterations with non-finite gradients "
        "(each is skipped, not applied).")
    loss_spike_factor: float = arg(
        2.0, "Warn and count a loss spike when the loss exceeds this multiple of its recent "
        "average (0 disables).")
    test: bool = arg(False, "Evaluate on the test split at the end of training.")
    torch_compile: bool = arg(
        False, "Compile every transformer block with torch.compile (as torchtitan does; the "
        "sparsifiers are custom ops, so Q-Sparse blocks compile whole). One process or data "
        "parallelism, any ZeRO stage; not with tensor/pipeline parallelism or MoE.")

    def validate(self) -> None:
        """Check the schedule, batch sizes and checkpoint settings (the global batch against
        the world size: :func:`validate`)."""
        _positive("train", self, ("micro_batch_size", "global_batch_size", "train_iters",
                                  "save_interval", "lr_decay_iters",
                                  "lr_wsd_decay_iters", "keep_last_n_checkpoints",
                                  "exit_interval", "max_consecutive_skipped_iters"))
        if self.exit_duration_in_mins is not None and self.exit_duration_in_mins <= 0:
            raise flag_error("train", "exit_duration_in_mins", f"got {self.exit_duration_in_mins}",
                       "use a positive number of minutes")
        if self.loss_spike_factor != 0 and self.loss_spike_factor <= 1:
            raise flag_error("train", "loss_spike_factor", f"got {self.loss_spike_factor}",
                       "use a factor above 1 (e.g. 2.0) or 0 to disable")
        if self.finetune and not self.load:
            raise flag_error("train", "finetune", "nothing to fine-tune from", "add --load DIR")
        if self.keep_last_n_checkpoints and not self.save:
            raise flag_error("train", "keep_last_n_checkpoints", "no checkpoints are saved",
                       "add --save DIR")
        decay_iters = self.lr_decay_iters or self.train_iters
        if self.lr_decay_style == "WSD":
            if self.lr_wsd_decay_iters is None:
                raise flag_error("train", "lr_wsd_decay_iters",
                           "WSD needs the length of its decay phase",
                           "add --lr-wsd-decay-iters N (e.g. 10-20% of --train-iters)")
            if self.lr_warmup_iters + self.lr_wsd_decay_iters > decay_iters:
                raise flag_error("train", "lr_wsd_decay_iters",
                           f"warm-up ({self.lr_warmup_iters}) + decay "
                           f"({self.lr_wsd_decay_iters}) exceed the schedule ({decay_iters})",
                           "shorten them or raise --train-iters")
        elif self.lr_wsd_decay_iters is not None:
            raise flag_error("train", "lr_wsd_decay_iters", f"only used with --lr-decay-style WSD, "
                       f"not {self.lr_decay_style}", "drop it or use --lr-decay-style WSD")
        _positive("train", self, ("lr_warmup_iters", "eval_iters", "eval_interval"),
                  allow_zero=True)
        if self.lr <= 0:
            raise flag_error("train", "lr", f"got {self.lr}", "use a positive learning rate")
        if self.lr > MAX_LR:
            raise flag_error("train", "lr", f"{self.lr} would move every weight by about that much per "
                       "step (AdamW)", f"use at most {MAX_LR} (typical: 1e-4 to 1e-2)")
        if not 0 <= self.min_lr <= self.lr:
            raise flag_error("train", "min_lr", f"{self.min_lr} is not within [0, --lr {self.lr}]",
                       "set it at or below --lr")
        if self.lr_warmup_iters > decay_iters:
            raise flag_error("train", "lr_warmup_iters",
                       f"warm-up ({self.lr_warmup_iters}) is longer than the decay "
                       f"({decay_iters})",
                       "shorten the warm-up or raise --lr-decay-iters/--train-iters")
        for n in ("adam_beta1", "adam_beta2"):
            v = getattr(self, n)
            if not 0.0 <= v < 1.0:
                raise flag_error("train", n, f"got {v}", "use a value in [0, 1)")
        if self.adam_eps <= 0:
            raise flag_error("train", "adam_eps", f"got {self.adam_eps}", "use a small positive number")
        if self.weight_decay < 0:
            raise flag_error("train", "weight_decay", f"got {self.weight_decay}", "use 0 or more")
        if self.clip_grad < 0:
            raise flag_error("train", "clip_grad", f"got {self.clip_grad}",
                       "use 0 (off) or a positive norm")
        if self.save_interval is not None and not self.save:
            raise flag_error("train", "save_interval", "a save interval without a save directory",
                       "add --save DIR")


@dataclass
class LogConfig:
    """Console and TensorBoard monitoring."""

    log_interval: int = arg(10, "Print (and write to TensorBoard) every this many iterations.")
    tensorboard_dir: str | None = arg(None, "Write TensorBoard event files here.")
    log_sparsity_per_layer: bool = arg(
        False, "Also log measured density per layer (per projection kind is always logged).")
    summary_json: str | None = arg(
        None, "Write a JSON summary of the run (final losses, throughput, density) to this file.")

    def validate(self) -> None:
        _positive("log", self, ("log_interval",))


@dataclass
class Config:
    """Everything a run needs; built by :func:`megatron_qsparse.arguments.parse`."""

    model: ModelConfig = field(default_factory=ModelConfig)
    qsparse: QSparseConfig = field(default_factory=QSparseConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    log: LogConfig = field(default_factory=LogConfig)

    def __post_init__(self) -> None:
        self.model.qsparse = self.qsparse

    def __setattr__(self, name: str, value) -> None:
        super().__setattr__(name, value)
        if name in ("model", "qsparse") and "model" in self.__dict__ and "qsparse" in self.__dict__:
            self.model.qsparse = self.qsparse  # the model carries the run's sparsity

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "Config":
        kw = {}
        for f in dataclasses.fields(cls):
            sub = f.default_factory()
            for k, v in (d.get(f.name) or {}).items():
                if not hasattr(sub, k):
                    raise ConfigError(f"unknown setting {f.name}.{k}; remove it")
                setattr(sub, k, v)
            kw[f.name] = sub
        return cls(**kw)


SECTIONS = ("model", "qsparse", "parallel", "data", "train", "log")


def flag_of(section: str, name: str) -> str:
    """The command-line spelling of a field, e.g. ``flag_of('model', 'num_layers') == '--num-layers'``."""
    cls = type(getattr(Config(), section))
    f = {f.name: f for f in dataclasses.fields(cls)}[name]
    return f.metadata.get("flag") or "--" + name.replace("_", "-")


def flag_error(section: str, name: str, problem: str, fix: str) -> ConfigError:
    """The one-line error of a setting: ``--flag: problem; fix`` (also for the sparsifier
    methods' own rules)."""
    return ConfigError(f"{flag_of(section, name)}: {problem}; {fix}")


def _positive(section: str, obj: Any, names: tuple[str, ...], allow_zero: bool = False) -> None:
    for n in names:
        v = getattr(obj, n)
        if v is None:
            continue
        if v < 0 or (v == 0 and not allow_zero):
            want = "a non-negative" if allow_zero else "a positive"
            raise flag_error(section, n, f"got {v}", f"use {want} integer")


def _finite(section: str, obj: Any) -> None:
    """Every float setting of a section is a finite number (nan/inf pass most range checks)."""
    for f in dataclasses.fields(obj):
        v = getattr(obj, f.name)
        if isinstance(v, float) and not math.isfinite(v):
            raise flag_error(section, f.name, f"got {v}", "use a finite number")


def validate(cfg: Config, world_size: int | None = None) -> Config:
    """Check every setting and their combinations; raise :class:`ConfigError` on the first problem.

    Each section checks its own fields (``ModelConfig.validate`` ...), then
    :func:`_cross_section_rules` the settings that span sections, then the checks registered with
    :func:`register_check` (each sparsifier method's rules, ``sparsity/methods/``). ``world_size``
    (when known) checks that the parallel layout divides the number of processes. The data files
    and the syntax of --data-path/--split are checked by ``megatron_qsparse.data.validation``
    (this module imports no package module). Returns ``cfg`` for chaining.
    """
    for section in SECTIONS:
        _finite(section, getattr(cfg, section))
        getattr(cfg, section).validate()
    _cross_section_rules(cfg, world_size)
    for check in _CHECKS:  # the sparsifier method's own rules (sparsity/methods/)
        check(cfg, world_size)
    return cfg


def _cross_section_rules(cfg: Config, world_size: int | None) -> None:
    """Settings of one section checked against another's, and the layout against the world size."""
    m, p, t = cfg.model, cfg.parallel, cfg.train
    tp, pp = p.tensor_model_parallel_size, p.pipeline_model_parallel_size
    if tp > 1:
        for name, value in (("num_attention_heads", m.num_attention_heads),
                            ("num_query_groups", m.resolved_query_groups()),
                            ("ffn_hidden_size", m.resolved_ffn_hidden_size())):
            if value % tp:
                raise flag_error("model", name, f"{value} is not divisible by "
                           f"--tensor-model-parallel-size {tp}",
                           f"use a multiple of {tp} or a tensor-parallel size that divides it")
    if pp > m.num_layers:
        raise flag_error("parallel", "pipeline_model_parallel_size",
                   f"{pp} stages for {m.num_layers} transformer blocks",
                   "use at most one stage per block")
    if world_size is not None and world_size % (tp * pp):
        raise flag_error("parallel", "tensor_model_parallel_size",
                   f"world size {world_size} is not divisible by TP x PP = {tp * pp}",
                   "launch a multiple of TP x PP processes")
    _moe_layout_rules(m, p, world_size)
    _compile_rules(m, p, t)
    if world_size is not None and t.global_batch_size is not None:
        dp = world_size // (tp * pp)
        if t.global_batch_size % (t.micro_batch_size * dp):
            raise flag_error("train", "global_batch_size",
                       f"{t.global_batch_size} is not divisible by micro-batch "
                       f"{t.micro_batch_size} x data-parallel size {dp}",
                       f"use a multiple of {t.micro_batch_size * dp}")


def _compile_rules(m: ModelConfig, p: ParallelConfig, t: TrainConfig) -> None:
    """What ``--torch-compile`` does not cover yet, each with the reason."""
    if not t.torch_compile:
        return
    if p.tensor_model_parallel_size > 1:
        raise flag_error("train", "torch_compile", "tensor parallelism is not compiled yet (its "
                   "row-parallel Top-K sizes an all-gather by K, which the warm-up changes, and "
                   "the TP collectives are not traced)", "drop --torch-compile or use "
                   "--tensor-model-parallel-size 1")
    if p.pipeline_model_parallel_size > 1:
        raise flag_error("train", "torch_compile", "DeepSpeed's pipeline engine runs the layers "
                   "itself, outside the compiled blocks", "drop --torch-compile or use "
                   "--pipeline-model-parallel-size 1")
    if m.num_experts is not None:
        raise flag_error("train", "torch_compile", "DeepSpeed's MoE routing has data-dependent "
                   "shapes (token dispatch by capacity)", "drop --torch-compile or --num-experts")


def _moe_layout_rules(m: ModelConfig, p: ParallelConfig, world_size: int | None) -> None:
    """How experts fit the parallel layout (the experts' own settings: ``ModelConfig.validate``)."""
    ep = p.expert_model_parallel_size
    if m.num_experts is None:
        if ep > 1:
            raise flag_error("parallel", "expert_model_parallel_size",
                       "expert parallelism needs experts", "add --num-experts E or drop it")
        return
    if m.num_experts % ep:
        raise flag_error("parallel", "expert_model_parallel_size",
                   f"{m.num_experts} experts do not split over {ep} expert-parallel ranks",
                   "use a divisor of --num-experts")
    if p.tensor_model_parallel_size > 1:
        # Our experts are not tensor-parallel, and DeepSpeed's MoE with a TP mpu either drops
        # duplicate tokens for non-TP experts or expects its own TP experts; see model/moe.py.
        raise flag_error("parallel", "tensor_model_parallel_size", "MoE layers do not support tensor "
                   "parallelism", "use --tensor-model-parallel-size 1 with --num-experts "
                   "(scale experts with --expert-model-parallel-size)")
    if p.pipeline_model_parallel_size > 1:
        raise flag_error("parallel", "pipeline_model_parallel_size", "MoE layers do not support "
                   "pipeline parallelism (the pipeline's loss sees only the last stage, not the "
                   "routers' auxiliary losses)", "use --pipeline-model-parallel-size 1 with "
                   "--num-experts")
    if p.zero_stage == 3:
        raise flag_error("parallel", "zero_stage", "DeepSpeed's MoE does not support ZeRO-3",
                   "use --zero-stage 0, 1 or 2 with --num-experts")
    if world_size is not None:
        dp = world_size // (p.tensor_model_parallel_size * p.pipeline_model_parallel_size)
        if dp % ep:
            raise flag_error("parallel", "expert_model_parallel_size",
                       f"data-parallel size {dp} is not divisible by {ep}",
                       "launch a multiple of --expert-model-parallel-size processes")


_CHECKS: list = []


def register_check(check) -> None:
    """Add ``check(cfg, world_size)`` to :func:`validate`: packages below this leaf module (the
    sparsifier registry, ``sparsity/methods/``) contribute the rules they own this way."""
    if check not in _CHECKS:
        _CHECKS.append(check)


def moe_layer_indices(m: ModelConfig) -> list[int]:
    """0-based indices of the blocks whose FFN is an MoE layer (empty for a dense model)."""
    if m.num_experts is None:
        return []
    return [i for i in range(m.num_layers) if i % m.moe_layer_freq == 0]


def data_parallel_size(cfg: Config, world_size: int) -> int:
    p = cfg.parallel
    return world_size // (p.tensor_model_parallel_size * p.pipeline_model_parallel_size)


def grad_accumulation_steps(cfg: Config, world_size: int) -> int:
    """Micro-batches per optimizer step on each data-parallel rank."""
    dp = data_parallel_size(cfg, world_size)
    gbs = cfg.train.global_batch_size or cfg.train.micro_batch_size * dp
    return gbs // (cfg.train.micro_batch_size * dp)


def padded_vocab_size(vocab_size: int, cfg: Config) -> int:
    """Megatron's vocabulary padding: a multiple of divisible-by x tensor-parallel size."""
    mult = cfg.model.make_vocab_size_divisible_by * cfg.parallel.tensor_model_parallel_size
    return int(math.ceil(vocab_size / mult) * mult)
