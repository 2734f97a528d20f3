"""Run an exported Q-Sparse model sparsely inside ``transformers``.

``transformers`` runs an exported directory densely; its ``config.json`` records the sparsifier
settings in a ``qsparse`` section (:mod:`megatron_qsparse.convert.hf`). :func:`sparsify_hf_model`
puts them back: a forward pre-hook on every q/k/v/o/gate/up/down ``nn.Linear`` passes the input
through our :class:`~megatron_qsparse.sparsity.Sparsifier` (the one implementation of the method)
before the matmul — the down projection's input is ``act(gate) * up``, as in our MLP. The result
equals our own model's forward (``tests/unit/test_checkpoint_convert.py``)::

    model = AutoModelForCausalLM.from_pretrained("hf/run")
    handles = sparsify_hf_model(model)      # sparse from here on
    for h in handles: h.remove()             # dense again
"""

from __future__ import annotations

import re

from torch import nn

from megatron_qsparse.config import QSparseConfig
from megatron_qsparse.convert.families import LLAMA, get_family
from megatron_qsparse.convert.hf import qsparse_config_from_hf
from megatron_qsparse.sparsity import build_sparsifier

_LAYER = re.compile(r"layers\.(\d+)\.")


def sparsify_hf_model(model: nn.Module, qsparse: QSparseConfig | None = None) -> list:
    """Hook the sparsifiers of ``qsparse`` (default: the model config's ``qsparse`` section) into
    a Hugging Face LLaMA/Mistral/Qwen2 model; returns the hook handles. Raises ValueError when
    the config records no sparsity and none is given."""
    if qsparse is None:
        rec = getattr(model.config, "qsparse", None)
        if not rec:
            raise ValueError("the model's config.json has no 'qsparse' section; pass "
                             "qsparse=QSparseConfig(...) to choose the sparsity")
        qsparse = qsparse_config_from_hf({"qsparse": rec})
    if qsparse.bitnet:
        raise ValueError("BitNet models need megatron-qsparse's own forward")
    # the family's projection names; LLaMA's (which all registered families share) otherwise
    family = get_family(getattr(model.config, "model_type", None)) or LLAMA
    handles = []
    for name, module in model.named_modules():
        kind = family.projection_kinds.get(name.rsplit(".", 1)[-1])
        m = _LAYER.search(name)
        if kind is None or m is None or not isinstance(module, nn.Linear):
            continue
        sparsifier = build_sparsifier(qsparse, kind, int(m.group(1)))
        handles.append(module.register_forward_pre_hook(
            lambda mod, args, s=sparsifier: (s(args[0]),) + tuple(args[1:])))
    if not handles:
        raise ValueError("no q/k/v/o/gate/up/down projections found: not a LLaMA-style model")
    return handles


__all__ = ["sparsify_hf_model"]
