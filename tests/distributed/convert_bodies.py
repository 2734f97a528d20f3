"""Test bodies for the Hugging Face import at TP > 1 (run on every rank of a DistributedPool)."""

from __future__ import annotations

import json
import os

import torch

from megatron_qsparse.config import Config, padded_vocab_size
from megatron_qsparse.model import GPTModel
from tests.distributed.tp_bodies import state


def imported_logits_vs_transformers(ckpt: str, hf_dir: str, arch: str, ratio: float | None
                                    ) -> float:
    """This rank's shard of an imported checkpoint in a TP model; max |logits - transformers'|
    (with ``ratio``: against the HF model with sparsified projection inputs)."""
    from tests.hf_models import VOCAB, hf_class, sparsified

    folder = os.path.join(ckpt, open(os.path.join(ckpt, "latest")).read().strip())
    meta = json.load(open(os.path.join(folder, "qsparse_meta.json")))
    cfg = Config.from_dict(meta["config"])
    st = state(cfg.parallel.tensor_model_parallel_size)
    model = GPTModel(cfg.model, padded_vocab_size(cfg.model.vocab_size, cfg),
                     parallel=st).eval()
    shard = torch.load(os.path.join(folder, f"mp_rank_{st.tp_rank:02d}_model_states.pt"),
                       weights_only=True)["module"]
    model.load_state_dict(shard)
    tokens = torch.randint(0, VOCAB, (2, 24), generator=torch.Generator().manual_seed(3))
    ref = hf_class(arch).from_pretrained(hf_dir).eval()
    with torch.no_grad():
        got = model(tokens)[..., :VOCAB]
        if ratio is None:
            want = ref(tokens).logits
        else:
            with sparsified(ref, ratio):
                want = ref(tokens).logits
    return (got - want).abs().max().item()
