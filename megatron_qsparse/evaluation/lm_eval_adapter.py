"""lm-evaluation-harness adapter: our checkpoints as an ``lm_eval`` model named ``qsparse``.

``QSparseLM`` loads a checkpoint directly (any tensor-parallel layout, merged into one process)
with the sparsity it was trained with, or with ``qsparse_mode`` / ``sparsity`` overrides, and
implements the three request types of ``lm_eval``:

- ``loglikelihood``: context + continuation run together, right-padded in batches sorted by
  length (the model is causal, so padding after a sequence never changes its positions), summing
  the continuation's log-probabilities; contexts longer than the model are cut from the left.
- ``loglikelihood_rolling``: ``lm_eval``'s disjoint rolling windows (``get_rolling_token_windows``
  + ``make_disjoint_window``) scored as above and summed per document.
- ``generate_until``: greedy, one request at a time through the KV-cache generator
  (:func:`megatron_qsparse.inference.generate`: one prefill, then one position per new token, on
  the model's own layers), stopping at the end-of-document token, a stop string or
  ``max_gen_toks``; the same tokens as re-running the whole sequence per token (the fallback for
  a model that is split for tensor parallelism), at O(length) instead of O(length²) per request.

The density every projection produced over the scoring requests is recorded (right padding
included; generation runs without the counters) and logged after each request type;
:meth:`QSparseLM.density` returns it.

Model arguments (``--model_args k=v,...``): ``load`` (checkpoint, required), ``sparsity`` (S for
every projection), ``qsparse_mode`` (``topk``, ``block``, ``relu``, ``none``), ``tokenizer_model``
(when the stored tokenizer path moved), ``dtype`` (``float32``, ``bfloat16``), ``max_length``,
``max_gen_toks``; ``batch_size`` and ``device`` come from ``lm_eval``'s own flags.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
import torch.nn.functional as F
from lm_eval import utils as lm_utils
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from lm_eval.models.utils import Collator, handle_stop_sequences, normalize_gen_kwargs
from tqdm import tqdm

from megatron_qsparse.config import ConfigError
from megatron_qsparse.evaluation.loading import EvalModel, build_eval_tokenizer, load_for_eval

logger = logging.getLogger(__name__)

MODEL_NAME = "qsparse"
_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
           "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}


@register_model(MODEL_NAME, "megatron-qsparse")
class QSparseLM(TemplateLM):
    """A megatron-qsparse checkpoint for ``lm_eval`` (see the module docstring)."""

    backend = "causal"
    #: :meth:`summary` of the instance that ran requests last (read by tools/evaluate.py after
    #: lm_eval's CLI, which does not hand back the model)
    last_summary: dict[str, Any] = {}

    def __init__(self, load: str | None = None, sparsity: float | None = None,
                 qsparse_mode: str | None = None, tokenizer_model: str | None = None,
                 batch_size: int | str = 8, device: str | None = None, dtype: str = "float32",
                 max_length: int | None = None, max_gen_toks: int = 256,
                 eval_model: EvalModel | None = None, tokenizer=None, **unused: Any):
        super().__init__()
        unused.pop("max_batch_size", None)
        if unused:
            raise ConfigError(f"--model_args: unknown argument(s) {', '.join(sorted(unused))}; "
                              "use load, sparsity, qsparse_mode, tokenizer_model, dtype, "
                              "max_length, max_gen_toks")
        if dtype not in _DTYPES:
            raise ConfigError(f"--model_args dtype: {dtype!r} is not one of "
                              f"{', '.join(_DTYPES)}")
        if device and str(device).startswith("cuda") and not torch.cuda.is_available():
            # lm_eval's --device defaults to cuda; run on the CPU when there is no GPU
            logger.warning("device %s requested but no GPU is visible; using the CPU", device)
            device = "cpu"
        self._device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        if eval_model is None:
            if not load:
                raise ConfigError("--model_args: no checkpoint; pass load=CHECKPOINT_DIR")
            eval_model = load_for_eval(str(load), qsparse_mode=qsparse_mode,
                                       qsparse_ratio=sparsity, device=self._device,
                                       dtype=_DTYPES[dtype])
        self.eval_model = eval_model
        self.model = eval_model.model
        self.tokenizer = tokenizer or build_eval_tokenizer(eval_model.cfg, tokenizer_model)
        if str(batch_size).startswith("auto"):
            logger.warning("batch_size %s is not supported; using 8", batch_size)
            batch_size = 8
        try:
            self.batch_size = int(batch_size)
        except ValueError:
            raise ConfigError(f"--batch_size: {batch_size!r} is not a number; use e.g. 8") from None
        if self.batch_size < 1:
            raise ConfigError(f"--batch_size: got {batch_size}; use a positive number")
        self._max_length = int(max_length or eval_model.max_length)
        if not 1 < self._max_length <= eval_model.max_length:
            raise ConfigError(f"--model_args max_length: {self._max_length} is outside "
                              f"[2, {eval_model.max_length}] (the model's positions)")
        self.max_gen_toks = int(max_gen_toks)
        from megatron_qsparse.sparsity import describe, reset_density, set_recording
        set_recording(self.model, True)
        reset_density(self.model)
        q = eval_model.cfg.qsparse
        logger.info("qsparse model %s: %s, max length %d, batch %d",
                    eval_model.folder, describe(q), self._max_length, self.batch_size)

    # ------------------------------------------------------------------ properties

    @property
    def eot_token_id(self) -> int:
        return int(self.tokenizer.eod)

    @property
    def prefix_token_id(self) -> int:
        # the token a document starts after: bos for tokenizers that add one, else end-of-document
        if getattr(self.tokenizer, "add_bos", False) and self.tokenizer.bos >= 0:
            return int(self.tokenizer.bos)
        return self.eot_token_id

    @property
    def max_length(self) -> int:
        return self._max_length

    @property
    def device(self) -> torch.device:
        return self._device

    @property
    def tokenizer_name(self) -> str:
        return self.tokenizer.name

    def density(self) -> dict[str, float]:
        """Measured density of every projection over all requests so far."""
        from megatron_qsparse.sparsity import collect_density
        return collect_density(self.model)

    def summary(self) -> dict[str, Any]:
        """Checkpoint, sparsity, measured density and activated parameters of the run so far."""
        from megatron_qsparse.model.accounting import activated_parameters, count_parameters
        from megatron_qsparse.sparsity import summary

        q, d = self.eval_model.cfg.qsparse, self.density()
        return {"checkpoint": self.eval_model.folder, **summary(q), "density": d,
                "activated_parameters": activated_parameters(self.model, d),
                "non_embedding_parameters": count_parameters(self.model, non_embedding=True)}

    def _log_density(self, what: str) -> None:
        QSparseLM.last_summary = self.summary()
        d = QSparseLM.last_summary["density"]
        kinds = "  ".join(f"{k[5:]} {v:.3f}" for k, v in d.items() if k.startswith("kind/"))
        logger.info("measured density after %s: %s", what, kinds)

    # ------------------------------------------------------------------ tokens

    def tok_encode(self, string: str, add_special_tokens: bool | None = None,
                   left_truncate_len: int | None = None, **kwargs) -> list[int]:
        ids = list(self.tokenizer.tokenize(string))
        bos = self.tokenizer.bos
        if add_special_tokens is False and getattr(self.tokenizer, "add_bos", False) and \
                ids and ids[0] == bos:
            ids = ids[1:]
        if left_truncate_len:
            ids = ids[-left_truncate_len:]
        return ids

    def tok_decode(self, tokens, skip_special_tokens: bool = True) -> str:
        if isinstance(tokens, int):
            tokens = [tokens]
        return self.tokenizer.detokenize(list(tokens))

    # ------------------------------------------------------------------ model calls

    @torch.no_grad()
    def _logits(self, rows: list[list[int]]) -> tuple[torch.Tensor, list[int]]:
        """fp32 logits ``[b, max_len, V]`` of right-padded ``rows``, and their lengths."""
        lengths = [len(r) for r in rows]
        batch = torch.full((len(rows), max(lengths)), self.eot_token_id, dtype=torch.long)
        for i, r in enumerate(rows):
            batch[i, :len(r)] = torch.tensor(r, dtype=torch.long)
        return self.model(batch.to(self._device)).float(), lengths

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False,
                              **kwargs) -> list[tuple[float, bool]]:
        def sort_key(req):
            toks = req[1] + req[2]
            return -len(toks), tuple(toks)

        re_ord = Collator(requests, sort_fn=sort_key)
        res: list[tuple[float, bool]] = []
        pbar = tqdm(total=len(requests), disable=disable_tqdm or self.rank != 0,
                    desc="Running loglikelihood requests")
        for chunk in re_ord.get_batched(n=self.batch_size):
            rows = []
            for _, ctx, cont in chunk:
                if not cont:
                    raise ValueError("loglikelihood request with an empty continuation")
                if len(cont) > self.max_length:
                    raise ValueError(f"continuation of {len(cont)} tokens is longer than the "
                                     f"model's {self.max_length} positions")
                rows.append((ctx + cont)[-(self.max_length + 1):][:-1])
            logits, lengths = self._logits(rows)
            logprobs = F.log_softmax(logits, dim=-1)
            for (key, _, cont), lp, n_inp in zip(chunk, logprobs, lengths):
                target = torch.tensor(cont, dtype=torch.long, device=lp.device)
                lp_cont = lp[n_inp - len(cont):n_inp]  # the positions that predict `cont`
                ll = float(lp_cont.gather(-1, target[:, None]).sum())
                greedy = bool((lp_cont.argmax(dim=-1) == target).all())
                res.append((ll, greedy))
                if key is not None:
                    self.cache_hook.add_partial("loglikelihood", key, (ll, greedy))
                pbar.update(1)
        pbar.close()
        self._log_density("loglikelihood requests")
        return re_ord.get_original(res)

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        windows, owner = [], []
        for i, (string,) in enumerate(req.args for req in requests):
            for ctx, cont in map(lm_utils.make_disjoint_window, lm_utils.get_rolling_token_windows(
                    token_list=self.tok_encode(string), prefix_token=self.prefix_token_id,
                    max_seq_len=self.max_length, context_len=1)):
                windows.append((None, ctx, cont))
                owner.append(i)
        scores = self._loglikelihood_tokens(windows, disable_tqdm=disable_tqdm)
        totals = [0.0] * len(requests)
        for i, (ll, _) in zip(owner, scores):
            totals[i] += ll
        for req, total in zip(requests, totals):
            self.cache_hook.add_partial("loglikelihood_rolling", (req.args[0],), total)
        return totals

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        re_ord = Collator([req.args for req in requests],
                          sort_fn=lambda x: (-len(self.tok_encode(x[0])), x[0]),
                          group_by="gen_kwargs", group_fn=lambda x: x[1])
        res: list[str] = []
        pbar = tqdm(total=len(requests), disable=disable_tqdm or self.rank != 0,
                    desc="Running generate_until requests")
        for chunk in re_ord.get_batched(n=self.batch_size):
            contexts, all_kwargs = zip(*chunk)
            kwargs = normalize_gen_kwargs(all_kwargs[0], self.max_gen_toks)
            # the end of document stops by id (it decodes to nothing, so it is no stop string)
            until = [s for s in handle_stop_sequences(kwargs.pop("until", None), eos=None) if s]
            max_gen = int(kwargs.pop("max_gen_toks"))
            if kwargs.get("do_sample"):
                logger.warning("do_sample requested; this adapter decodes greedily")
            outs = self.greedy_generate([self.tok_encode(c) for c in contexts], until, max_gen)
            for ctx, out in zip(contexts, outs):
                res.append(out)
                self.cache_hook.add_partial("generate_until", (ctx, all_kwargs[0]), out)
                pbar.update(1)
        pbar.close()
        self._log_density("generation requests")
        return re_ord.get_original(res)

    def _inference_model(self):
        """The KV-cache generator's model around ``self.model`` (its own layers, untouched: the
        training forward with a cache), or None for a tensor-parallel shard."""
        if getattr(self, "_im", None) is None:
            from megatron_qsparse.inference import InferenceModel
            from megatron_qsparse.sparsity import set_recording

            parallel = getattr(self.model, "parallel", None)
            if parallel is not None and parallel.tp_size != 1:
                self._im = False
            else:
                self._im = InferenceModel(self.model, sparse_kernel=False, compiled_step=False)
                set_recording(self.model, True)  # InferenceModel switched it off
        return self._im or None

    def greedy_generate(self, prompts: list[list[int]], until: list[str],
                        max_gen_toks: int) -> list[str]:
        """Greedy continuations of token ``prompts``, cut before the first stop string."""
        max_ctx = self.max_length - max_gen_toks
        if max_ctx < 1:
            raise ValueError(f"max_gen_toks {max_gen_toks} leaves no room for a prompt in the "
                             f"model's {self.max_length} positions; lower it")
        ctx = [(p or [self.prefix_token_id])[-max_ctx:] for p in prompts]
        im = self._inference_model() if max_gen_toks > 0 else None
        if im is None:
            return self._greedy_generate_full(ctx, until, max_gen_toks)
        from megatron_qsparse.inference import generate
        from megatron_qsparse.sparsity import set_recording

        def stop(tokens: list[int]) -> bool:
            return bool(until) and any(s in self.tok_decode(tokens) for s in until)

        out = []
        # the generator runs under inference_mode: density counters are not touched there (the
        # density of generation requests is their prompts' and tokens' no more)
        set_recording(self.model, False)
        try:
            for c in ctx:
                g = generate(im, c, max_gen_toks, greedy=True,
                             vocab_size=self.eval_model.vocab_size,
                             stop_ids=(self.eot_token_id,), stop_when=stop).tokens
                if g and g[-1] == self.eot_token_id:
                    g = g[:-1]
                out.append(self._cut(self.tok_decode(g), until))
        finally:
            set_recording(self.model, True)
        return out

    @staticmethod
    def _cut(text: str, until: list[str]) -> str:
        return text[:min((text.find(s) for s in until if s in text), default=len(text))]

    def _greedy_generate_full(self, ctx: list[list[int]], until: list[str],
                              max_gen_toks: int) -> list[str]:
        """Greedy continuations, batched, re-running the whole sequence for every new token."""
        prompts = ctx
        gen: list[list[int]] = [[] for _ in prompts]
        done = [max_gen_toks <= 0] * len(prompts)
        vocab = self.eval_model.vocab_size
        for _ in range(max_gen_toks):
            active = [i for i, d in enumerate(done) if not d]
            if not active:
                break
            logits, lengths = self._logits([ctx[i] + gen[i] for i in active])
            nxt = logits[torch.arange(len(active)), torch.tensor(lengths) - 1, :vocab].argmax(-1)
            for i, tok in zip(active, nxt.tolist()):
                if tok == self.eot_token_id:
                    done[i] = True
                    continue
                gen[i].append(tok)
                if len(gen[i]) >= max_gen_toks or \
                        (until and any(s in self.tok_decode(gen[i]) for s in until)):
                    done[i] = True
        return [self._cut(self.tok_decode(g), until) for g in gen]
