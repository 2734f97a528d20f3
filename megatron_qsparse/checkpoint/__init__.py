"""Our checkpoints on disk, below training/, convert/, evaluation/ and inference/.

- :mod:`~megatron_qsparse.checkpoint.layout`: file and folder names, tags, ``latest``, the
  metadata file (:func:`read_meta`, :func:`resolve_checkpoint`);
- :mod:`~megatron_qsparse.checkpoint.safe`: the allow-list for ``torch.load(weights_only=True)``;
- :mod:`~megatron_qsparse.checkpoint.reader`: any TP x PP (and MoE) checkpoint as full tensors
  (:func:`read_checkpoint`), and the model it holds (:func:`load_model`).

Writing is the training engine's (:mod:`megatron_qsparse.training.checkpointing`) and the
converters' (:mod:`megatron_qsparse.convert.layout`).
"""

from megatron_qsparse.checkpoint.layout import (LATEST, LAYER_FILE, META_NAME, MODEL_FILE,
                                                RNG_FILE, TMP_PREFIX, check_layout,
                                                list_checkpoints, read_meta, resolve_checkpoint,
                                                tag_for)
from megatron_qsparse.checkpoint.reader import (TensorSource, load_model, read_checkpoint,
                                                read_model_state)
from megatron_qsparse.checkpoint.safe import deepspeed_safe_globals

__all__ = ["LATEST", "LAYER_FILE", "META_NAME", "MODEL_FILE", "RNG_FILE", "TMP_PREFIX",
           "TensorSource", "check_layout", "deepspeed_safe_globals", "list_checkpoints",
           "load_model", "read_checkpoint", "read_meta", "read_model_state",
           "resolve_checkpoint", "tag_for"]
