"""The GPT (LLaMA-style decoder) model and its parameter / FLOP accounting."""

from __future__ import annotations

import contextlib
import functools
import logging

import torch
from torch import nn

from megatron_qsparse.config import ModelConfig, QSparseConfig
from megatron_qsparse.model.transformer import TransformerBlock, build_norm
from megatron_qsparse.parallel.cross_entropy import vocab_parallel_cross_entropy
from megatron_qsparse.parallel.layers import (ColumnParallelLinear, RowParallelLinear,
                                              VocabParallelEmbedding, full_numel,
                                              parallel_lm_logits)
from megatron_qsparse.parallel.mappings import gather_from_tensor_parallel
from megatron_qsparse.parallel.random import checkpoint
from megatron_qsparse.parallel.state import ParallelState, get_parallel_state

logger = logging.getLogger(__name__)


class GPTModel(nn.Module):
    """Embedding → ``num_layers`` :class:`TransformerBlock` → final norm → LM head.

    The seven projections of every block (q/k/v fused, o, gate/up fused, down) sparsify their
    input as ``qsparse_cfg`` says. The LM head's input is *not* sparsified (the paper sparsifies
    the block projections only), nor BitNet-quantized. The head is the transposed input embedding
    unless ``untie_embeddings_and_output_weights``.

    Initialisation (deterministic under ``torch.manual_seed``): every weight ~ N(0, std), the
    output projections (o, down) with ``std / sqrt(2·num_layers)`` (Megatron's scaled init), norm
    weights 1, biases 0.

    ``vocab_size`` is the padded vocabulary (the caller pads it).

    ``parallel`` (default: the current :class:`~megatron_qsparse.parallel.state.ParallelState`)
    decides the tensor-parallel shards every layer holds; the code below is the same for any TP
    size. Under TP the vocabulary is split too: the loss is the vocab-parallel cross entropy, and
    logits are all-gathered only when asked for (``labels=None``).

    ``init_seed``: when given, piece ``i`` of the layer sequence (0 the embedding, ``1..L`` the
    blocks, ``L+1`` the final norm, ``L+2`` the untied head) is initialised from
    ``torch.manual_seed(init_seed + i)``, exactly as DeepSpeed's pipeline module seeds its layers
    (:func:`build_pipeline_model`), so any pipeline split starts from the same weights. Without
    it the pieces draw one after another from the current generator.

    Mixture of experts (``--num-experts``, :mod:`megatron_qsparse.model.moe`):
    ``expert_parallel_size`` splits each MoE layer's experts over that many ranks. The forward
    still returns the pure LM loss; the routers' weighted auxiliary losses of the latest forward
    are :func:`~megatron_qsparse.model.moe.moe_aux_loss` ``(model)``, which the training loop
    adds before ``backward``.
    """

    def __init__(self, model_cfg: ModelConfig, qsparse_cfg: QSparseConfig, vocab_size: int,
                 parallel: ParallelState | None = None, init_seed: int | None = None,
                 expert_parallel_size: int = 1):
        super().__init__()
        self.config, self.qsparse_config, self.vocab_size = model_cfg, qsparse_cfg, vocab_size
        self.parallel = parallel if parallel is not None else get_parallel_state()
        self.recompute_blocks = model_cfg.resolved_recompute() == "full"
        std = model_cfg.init_method_std
        L = model_cfg.num_layers
        with _seeded(init_seed, 0):
            self.embedding = VocabParallelEmbedding(vocab_size, model_cfg.hidden_size, std,
                                                    parallel=self.parallel)
        layers = []
        for i in range(L):
            with _seeded(init_seed, 1 + i):
                layers.append(TransformerBlock(model_cfg, qsparse_cfg, i, self.parallel,
                                               ep_size=expert_parallel_size))
        self.layers = nn.ModuleList(layers)
        self.final_norm = build_norm(model_cfg)
        self.output_layer = None
        if model_cfg.untie_embeddings_and_output_weights:
            with _seeded(init_seed, L + 2):
                self.output_layer = ColumnParallelLinear(
                    model_cfg.hidden_size, vocab_size, bias=False, sparsifier=None,
                    init_method_std=std, parallel=self.parallel)
            self.output_layer.is_lm_head = True
        logger.debug("GPTModel: %d parameters", count_parameters(self))

    def output_weight(self) -> torch.Tensor:
        """The LM head matrix ``[vocab, hidden]`` (the embedding when tied; this rank's vocabulary
        rows under TP)."""
        return self.embedding.weight if self.output_layer is None else self.output_layer.weight

    def forward(self, tokens: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        """Logits ``[b, s, V]`` when ``labels`` is None, else the fp32 per-token loss ``[b, s]``.

        The cross entropy is computed in fp32 (fp64 for an fp64 model); label ``-100`` gives a
        loss of 0 at that position.
        """
        h = self.embedding(tokens)
        recompute = self.recompute_blocks and self.training and torch.is_grad_enabled()
        for layer in self.layers:
            h = checkpoint(layer, h, state=self.parallel) if recompute else layer(h)
        h = self.final_norm(h)
        logits = parallel_lm_logits(h, self.output_weight(), self.parallel)  # [b, s, V/tp]
        if labels is None:
            return gather_from_tensor_parallel(logits, self.parallel)
        return vocab_parallel_cross_entropy(logits, labels, self.parallel)


def _seeded(seed: int | None, offset: int) -> contextlib.AbstractContextManager:
    """Draw from ``torch.manual_seed(seed + offset)`` inside the block (the caller's generator is
    restored after); a no-op when ``seed`` is None."""
    if seed is None:
        return contextlib.nullcontext()

    @contextlib.contextmanager
    def ctx():
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed + offset)
            yield
    return ctx()


# ---------------------------------------------------------------------------------------------
# accounting


def _lm_params(model: nn.Module) -> set[int]:
    """ids of the input embedding's and the LM head's parameters."""
    ids = set()
    for m in model.modules():
        if isinstance(m, VocabParallelEmbedding) or getattr(m, "is_lm_head", False):
            ids.update(id(p) for p in m.parameters())
    return ids


def _over_stages(model: nn.Module, value: float) -> float:
    """Sum ``value`` over the pipeline stages when ``model`` is one stage of a pipeline (every
    stage must call this), else ``value``."""
    parallel = getattr(model, "pipeline_state", None)
    if parallel is None or parallel.pp_size == 1:
        return value
    t = torch.tensor([float(value)], dtype=torch.float64)
    torch.distributed.all_reduce(t, group=parallel.pp_group)
    return t.item()


def _unique(model: nn.Module):
    """Parameters, each once: a pipeline stage's copy of a tied weight that another stage owns
    (the embedding on the last stage) is left out."""
    return [p for p in model.parameters() if not getattr(p, "pipeline_duplicate", False)]


def count_parameters(model: nn.Module, non_embedding: bool = False) -> int:
    """Number of parameters (shared ones once) of the full model, also when ``model`` holds
    tensor-parallel shards or is one stage of a pipeline (then every stage must call this).
    ``non_embedding`` leaves out the input embedding and the LM head (Kaplan's N, as in the
    Q-Sparse scaling law)."""
    skip = _lm_params(model) if non_embedding else set()
    # an expert parameter stands for expert_parallel_size different ones (one per EP rank)
    local = sum(full_numel(p) * getattr(p, "expert_parallel_size", 1)
                for p in _unique(model) if id(p) not in skip)
    return int(_over_stages(model, local))


def _density_of(density: dict | float | None, kind: str, layer: int | None = None) -> float:
    if density is None:
        return 1.0
    if isinstance(density, (int, float)):
        return float(density)
    for key in ((f"layer{layer}/{kind}",) if layer is not None else ()) + (f"kind/{kind}", kind):
        if key in density:
            return float(density[key])
    return 1.0


def activated_parameters(model: nn.Module, density: dict | float | None) -> float:
    """Parameters used per token given the measured input density of each projection.

    A sparse projection with input density ``ρ`` uses ``ρ`` of its weight columns, so it counts
    ``ρ·out·in`` (+ its bias); norms count fully. Like :func:`count_parameters` with
    ``non_embedding=True``, the input embedding (a row lookup, not a matmul) and the LM head are
    left out, so ``activated / non-embedding total = 1 - S`` for uniform Top-K.

    ``density`` is :func:`~megatron_qsparse.sparsity.collect_density`'s dict (``layer<i>/<kind>``
    is used where present, else ``kind/<kind>``, else a bare ``<kind>`` key), one float for every
    projection, or None; a projection with no entry counts as dense.

    In an MoE layer a token uses only the experts it is routed to: the experts count
    ``k·kept/E`` of all experts' parameters (``k`` routed experts, ``kept`` the measured fraction
    of routes within capacity, 1 before any forward), each expert projection again scaled by its
    measured input density; the router counts fully.
    """
    from megatron_qsparse.model.moe import moe_layers

    total = 0.0
    counted = _lm_params(model)
    share: dict[int, float] = {}  # id(expert linear) -> fraction of all experts used per token
    for moe in moe_layers(model):
        frac = moe.topk * moe.kept_routes_fraction() / moe.num_experts * moe.ep_size
        share.update({id(m): frac for m in moe.moe.deepspeed_moe.experts.modules()})
    for m in model.modules():
        if isinstance(m, (ColumnParallelLinear, RowParallelLinear)) and m.sparsifier is not None:
            rho = _density_of(density, m.sparsifier.kind, m.sparsifier.layer)
            n = rho * full_numel(m.weight) + (full_numel(m.bias) if m.bias is not None else 0)
            total += n * share.get(id(m), 1.0)
            counted.update(id(p) for p in m.parameters())
    total += sum(full_numel(p) for p in _unique(model) if id(p) not in counted)
    return _over_stages(model, total)


def projection_shapes(cfg: ModelConfig) -> dict[str, tuple[int, int]]:
    """``(in, out)`` of each projection kind of one block."""
    h, hd = cfg.hidden_size, cfg.resolved_kv_channels()
    nq, nkv = cfg.num_attention_heads, cfg.resolved_query_groups()
    f = cfg.resolved_ffn_hidden_size()
    return {"qkv": (h, (nq + 2 * nkv) * hd), "o": (nq * hd, h), "gate_up": (h, 2 * f),
            "down": (f, h)}


def flops_per_token(model_cfg: ModelConfig, vocab: int, seq_len: int,
                    density: dict | float | None = None) -> float:
    """Training FLOPs per token (forward + backward = 3 × forward; divide by 3 for inference).

    ``6·(N_proj + V·h) + 12·L·s·nq·hd``: every matmul parameter costs 6 FLOPs per token (PaLM's
    count), and attention scores and values the full ``s × s`` product (no causal halving).
    With ``density`` (as in :func:`activated_parameters`) the projection FLOPs of each kind are
    scaled by its input density — the nominal count of an ideal sparse kernel; attention and the
    LM head stay dense. Norms, activations and the softmax are ignored.

    An MoE layer's FFN counts its ``k`` routed experts (``--moe-router-topk``) plus the router's
    ``h × E`` matmul.
    """
    from megatron_qsparse.config import moe_layer_indices

    L = model_cfg.num_layers
    moe = set(moe_layer_indices(model_cfg))
    proj = 0.0
    for kind, (n_in, n_out) in projection_shapes(model_cfg).items():
        per = [_density_of(density, kind, i)
               * (model_cfg.moe_router_topk if i in moe and kind in ("gate_up", "down") else 1)
               for i in range(L)]
        proj += sum(per) * n_in * n_out
    proj += len(moe) * model_cfg.hidden_size * (model_cfg.num_experts or 0)
    attn = 12.0 * L * seq_len * model_cfg.num_attention_heads * model_cfg.resolved_kv_channels()
    return 6.0 * (proj + vocab * model_cfg.hidden_size) + attn


def describe(model_cfg: ModelConfig, vocab: int) -> str:
    """One-line summary of a model's size, for logs."""
    from megatron_qsparse.config import moe_layer_indices

    dims = projection_shapes(model_cfg)
    n = model_cfg.num_layers * sum(i * o for i, o in dims.values())
    moe, E = len(moe_layer_indices(model_cfg)), model_cfg.num_experts or 1
    ffn = sum(i * o for k, (i, o) in dims.items() if k in ("gate_up", "down"))
    n += moe * ((E - 1) * ffn + model_cfg.hidden_size * E)
    experts = (f", {E} experts (top-{model_cfg.moe_router_topk}) in {moe} blocks" if moe else "")
    return (f"{model_cfg.num_layers} layers, hidden {model_cfg.hidden_size}{experts}, "
            f"{n / 1e6:.1f}M projection params, vocab {vocab}, "
            f"{flops_per_token(model_cfg, vocab, model_cfg.seq_length) / 1e9:.2f} GFLOP/token")


# ---------------------------------------------------------------------------------------------
# the pipeline form: a sequence of layer specs for DeepSpeed's pipeline engine

PIPE_EMBED_KEY = "embed"


def _tied_lm_head(embedding: VocabParallelEmbedding, h: torch.Tensor) -> torch.Tensor:
    """The LM head of a tied model: the (last stage's copy of the) input embedding, transposed."""
    return parallel_lm_logits(h, embedding.weight, embedding.parallel)


def mean_loss(per_token: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean of the per-token loss over the trained targets (label != -100) of the micro-batch;
    the plain mean when every target is trained (pretraining)."""
    trained = labels != -100
    return (per_token.float() * trained).sum() / trained.sum().clamp(min=1)


def _pipe_loss(parallel: ParallelState, logits: torch.Tensor, labels: torch.Tensor
               ) -> torch.Tensor:
    """The training loss of a micro-batch, as without a pipeline: :func:`mean_loss` of the
    per-token vocab-parallel cross entropy."""
    return mean_loss(vocab_parallel_cross_entropy(logits, labels, parallel), labels)


def pipeline_specs(model_cfg: ModelConfig, qsparse_cfg: QSparseConfig, vocab_size: int,
                   parallel: ParallelState) -> list:
    """The layer sequence of :class:`GPTModel` as DeepSpeed layer specs.

    Index 0 the embedding, ``1..L`` the blocks, ``L+1`` the final norm, ``L+2`` the LM head: a
    :class:`~deepspeed.pipe.TiedLayerSpec` sharing the embedding (its gradient is all-reduced
    between the first and last stage) or, untied, its own column-parallel matrix. Checkpoints
    hold one file per index (``layer_XX-model_YY-model_states.pt``), whatever the stage count.
    """
    from deepspeed.pipe import LayerSpec, TiedLayerSpec

    std = model_cfg.init_method_std
    h = model_cfg.hidden_size
    embed = (VocabParallelEmbedding, vocab_size, h, std)
    tied = not model_cfg.untie_embeddings_and_output_weights
    specs = [TiedLayerSpec(PIPE_EMBED_KEY, *embed, parallel=parallel, tied_weight_attr="weight")
             if tied else LayerSpec(*embed, parallel=parallel)]
    specs += [LayerSpec(TransformerBlock, model_cfg, qsparse_cfg, i, parallel)
              for i in range(model_cfg.num_layers)]
    specs.append(LayerSpec(type(build_norm(model_cfg)), h, model_cfg.norm_epsilon))
    if tied:
        specs.append(TiedLayerSpec(PIPE_EMBED_KEY, *embed, parallel=parallel,
                                   forward_fn=_tied_lm_head, tied_weight_attr="weight"))
    else:
        specs.append(LayerSpec(ColumnParallelLinear, h, vocab_size, bias=False, sparsifier=None,
                               init_method_std=std, parallel=parallel))
    return specs


def pipeline_layer_names(model_cfg: ModelConfig) -> dict[int, str]:
    """Spec index -> the :class:`GPTModel` prefix of its parameters (checkpoint conversion)."""
    L = model_cfg.num_layers
    names = {0: "embedding.", L + 1: "final_norm."}
    names.update({1 + i: f"layers.{i}." for i in range(L)})
    if model_cfg.untie_embeddings_and_output_weights:
        names[L + 2] = "output_layer."
    return names


def build_pipeline_model(model_cfg: ModelConfig, qsparse_cfg: QSparseConfig, vocab_size: int,
                         parallel: ParallelState, *, init_seed: int,
                         partition_method: str = "uniform"):
    """This rank's stage of the model as a ``deepspeed.pipe.PipelineModule``.

    Stages follow ``parallel.topology``; ``partition_method`` ``uniform`` gives every stage the same
    number of transformer blocks (the first also holds the embedding, the last the norm and the
    head), ``parameters`` balances parameter counts. Layer ``i`` is initialised from
    ``init_seed + i`` (as :class:`GPTModel` with the same ``init_seed``). Full recomputation
    (``--recompute-granularity full``) checkpoints every block.
    """
    from deepspeed.pipe import PipelineModule

    full = model_cfg.resolved_recompute() == "full"
    method = "type:TransformerBlock" if partition_method == "uniform" else partition_method
    module = PipelineModule(
        layers=pipeline_specs(model_cfg, qsparse_cfg, vocab_size, parallel),
        topology=parallel.topology, loss_fn=functools.partial(_pipe_loss, parallel),
        seed_layers=True, base_seed=init_seed, seed_fn=torch.manual_seed,
        partition_method=method, activation_checkpoint_interval=1 if full else 0,
        activation_checkpoint_func=functools.partial(checkpoint, state=parallel),
        checkpointable_layers=["TransformerBlock"])
    module.config, module.qsparse_config, module.vocab_size = model_cfg, qsparse_cfg, vocab_size
    module.pipeline_state = parallel
    last = len(module._layer_specs) - 1
    for idx, fn in enumerate(module.forward_funcs):
        if idx + module._local_start == last and isinstance(fn, ColumnParallelLinear):
            fn.is_lm_head = True
    if parallel.pp_rank > 0:  # the first stage owns the tied embedding
        for tied in module.tied_modules.values():
            for p in tied.parameters():
                p.pipeline_duplicate = True
    return module


__all__ = ["GPTModel", "build_pipeline_model", "mean_loss", "pipeline_specs", "pipeline_layer_names", "count_parameters", "activated_parameters", "flops_per_token",
           "projection_shapes", "describe"]
