"""Evaluation: sliding-window perplexity, the lm_eval adapter and checkpoint loading for eval.

Every number is checked against a computation written independently here: a plain forward pass
of the model and ``torch.nn.functional.cross_entropy`` / ``log_softmax``.
"""

from __future__ import annotations

import math
import socket

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from megatron_qsparse.config import ConfigError
from megatron_qsparse.evaluation import load_for_eval, sliding_window_nll
from megatron_qsparse.evaluation.perplexity import jsonl_stream, window_plan
from tests.eval_checkpoint import tiny_config, write_checkpoint
from tests.helpers import ROOT

SEQ = 32


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    path = tmp_path_factory.mktemp("eval_ckpt")
    write_checkpoint(str(path), tiny_config())
    return str(path)


@pytest.fixture(scope="module")
def em(ckpt):
    return load_for_eval(ckpt)


@pytest.fixture(scope="module")
def lm(em):
    from megatron_qsparse.evaluation.lm_eval_adapter import QSparseLM

    return QSparseLM(eval_model=em, batch_size=3, device="cpu")


def _stream(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 4000, size=n)


# ------------------------------------------------------------------------------ perplexity


@pytest.mark.parametrize("n,seq,stride", [(100, 8, 8), (100, 8, 3), (9, 8, 1), (2, 8, 8),
                                          (57, 16, 16), (57, 16, 5)])
def test_window_plan_scores_every_target_once_within_the_context(n, seq, stride):
    seen = []
    for begin, end, first in window_plan(n, seq, stride):
        assert end - begin <= seq + 1 and begin < first < end or first == end
        seen += range(first, end)
        # a target scored after the first window has at least seq - stride tokens of context
        if begin > 0:
            assert first - begin >= seq - stride + 1
    assert seen == list(range(1, n))


def test_window_plan_rejects_a_stride_that_skips_tokens():
    with pytest.raises(ConfigError, match="--stride: 9 is outside"):
        window_plan(100, 8, 9)


def _independent_hf_recipe(model, x: torch.Tensor, window: int, stride: int) -> tuple[float, int]:
    """The Hugging Face perplexity recipe, on windows of ``window`` inputs (+1 target)."""
    total, count, prev_end = 0.0, 0, 0
    for begin in range(0, len(x), stride):
        end = min(begin + window + 1, len(x))
        trg_len = end - prev_end
        ids = x[begin:end]
        target = ids.clone()
        target[:-trg_len] = -100
        logits = model(ids[None, :-1])[0].double()
        nll = F.cross_entropy(logits, target[1:], ignore_index=-100, reduction="sum")
        total += float(nll)
        count += int((target[1:] != -100).sum())
        prev_end = end
        if end == len(x):
            break
    return total, count


@pytest.mark.parametrize("stride,batch", [(SEQ, 1), (SEQ, 4), (SEQ // 2, 3), (5, 8)])
def test_perplexity_equals_exp_of_mean_token_loss(em, stride, batch):
    x = torch.as_tensor(_stream(203 if stride == SEQ else 101))
    with torch.no_grad():
        total, count = _independent_hf_recipe(em.model, x, SEQ, stride)
    r = sliding_window_nll(em.model, x.numpy(), SEQ, stride, batch_size=batch)
    assert r.tokens == count == len(x) - 1
    assert r.perplexity == pytest.approx(math.exp(total / count), rel=1e-6)
    # top-K at S = 0.5 keeps exactly half of every (even-width) projection input
    assert r.density["kind/qkv"] == 0.5 and r.density["kind/gate_up"] == 0.5


def test_jsonl_stream_and_bits_per_byte(em, tmp_path):
    from megatron_qsparse.evaluation import build_eval_tokenizer

    tok = build_eval_tokenizer(em.cfg)
    texts = ["In the beginning God created the heaven and the earth.", "And there was light \u00e9."]
    p = tmp_path / "d.jsonl"
    p.write_text("".join('{"text": %s}\n' % __import__("json").dumps(t) for t in texts))
    s = jsonl_stream(str(p), tok)
    want = [tok.eod] + tok.tokenize(texts[0]) + [tok.eod] + tok.tokenize(texts[1]) + [tok.eod]
    assert s.tokens.tolist() == want and s.documents == 2
    assert s.bytes == sum(len(t.encode("utf-8")) for t in texts)
    r = sliding_window_nll(em.model, s.tokens, SEQ, SEQ)
    r.bytes = s.bytes
    assert r.bits_per_byte == pytest.approx(r.nll_sum / math.log(2) / s.bytes)
    cut = jsonl_stream(str(p), tok, max_tokens=5)
    assert cut.tokens.tolist() == want[:5] and cut.documents == 1
    assert cut.bytes == len(tok.detokenize(want[1:5]).encode("utf-8"))
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"body": "x"}\n')
    with pytest.raises(ConfigError, match="bad.jsonl:1: no string field 'text'"):
        jsonl_stream(str(bad), tok)


# ------------------------------------------------------------------------------ loading


def test_tensor_parallel_checkpoint_is_merged_exactly(tmp_path, em):
    full = write_checkpoint(str(tmp_path), tiny_config(tp=2))
    merged = load_for_eval(str(tmp_path))
    assert merged.checkpoint_tp == 2
    sd = merged.model.state_dict()
    assert set(sd) == set(full) and all(torch.equal(sd[k], full[k]) for k in full)
    x = _stream(80)
    a = sliding_window_nll(merged.model, x, SEQ)
    b = sliding_window_nll(em.model, x, SEQ)
    assert a.nll_sum == b.nll_sum  # same seed and weights as the TP = 1 checkpoint


def test_loading_errors_are_one_line(tmp_path, ckpt):
    with pytest.raises(ConfigError, match="neither a checkpoint folder"):
        load_for_eval(str(tmp_path))
    with pytest.raises(ConfigError, match=r"--qsparse-ratio: sparsity ratio 1.5 is outside"):
        load_for_eval(ckpt, qsparse_ratio=1.5)
    # weights that do not fit the model of the stored config
    other = tmp_path / "other"
    write_checkpoint(str(other), tiny_config())
    meta_path = other / "iter_0000010" / "qsparse_meta.json"
    meta = __import__("json").loads(meta_path.read_text())
    meta["config"]["model"]["ffn_hidden_size"] = 64
    meta_path.write_text(__import__("json").dumps(meta))
    with pytest.raises(ConfigError, match=r"tensor layers.0.mlp.gate_up.weight has shape"):
        load_for_eval(str(other))


# ------------------------------------------------------------------------------ lm_eval adapter


def _req(kind: str, *args):
    from lm_eval.api.instance import Instance

    return Instance(request_type=kind, doc={}, arguments=args, idx=0)


def _direct_loglikelihood(em, tok, context: str, continuation: str, max_len: int):
    whole = tok.tokenize(context + continuation)
    cont = whole[len(tok.tokenize(context)):]
    inp = whole[-(max_len + 1):]
    with torch.no_grad():
        lp = F.log_softmax(em.model(torch.tensor([inp[:-1]]))[0].double(), dim=-1)
    rows = lp[len(inp) - 1 - len(cont):]
    ll = sum(float(rows[i, t]) for i, t in enumerate(cont))
    greedy = all(int(rows[i].argmax()) == t for i, t in enumerate(cont))
    return ll, greedy


def test_adapter_loglikelihood_equals_a_direct_forward_pass(lm, em):
    long_ctx = " ".join(["And the LORD spake unto Moses, saying"] * 12)  # > 32 tokens: cut left
    pairs = [("In the beginning God created", " the heaven"),
             ("And God said,", " Let there be light"),
             ("And", " the earth was without form, and void"),
             (long_ctx, " and Aaron"),
             ("Thou shalt not", " kill")]
    assert len(lm.tok_encode(long_ctx)) > SEQ
    got = lm.loglikelihood([_req("loglikelihood", c, x) for c, x in pairs])
    for (c, x), (ll, greedy) in zip(pairs, got):
        want_ll, want_greedy = _direct_loglikelihood(em, lm.tokenizer, c, x, SEQ)
        assert ll == pytest.approx(want_ll, rel=1e-5, abs=1e-4), (c, x)
        assert greedy == want_greedy
    # a greedy continuation is recognised as such
    ctx = "And God saw the light"
    ids = lm.tok_encode(ctx)
    with torch.no_grad():
        nxt = int(em.model(torch.tensor([ids]))[0, -1, :em.vocab_size].argmax())
    (_, greedy), = lm._loglikelihood_tokens([(None, ids, [nxt])])
    assert greedy


def test_rolling_loglikelihood_equals_disjoint_window_perplexity(lm, em):
    # lm_eval's disjoint rolling windows = our stride = seq-length windows over [eod] + ids when
    # the text is a whole number of windows (lm_eval gives a shorter last window more context)
    words = ("And the evening and the morning were the third day, and God saw that it was "
             "good").split() * 6
    n = len(words)
    while len(lm.tok_encode(" ".join(words[:n]))) % SEQ:
        n -= 1
    text = " ".join(words[:n])
    ids = lm.tok_encode(text)
    assert len(ids) >= 3 * SEQ and len(ids) % SEQ == 0
    (ll,) = lm.loglikelihood_rolling([_req("loglikelihood_rolling", text)])
    r = sliding_window_nll(em.model, [lm.prefix_token_id] + ids, SEQ, SEQ)
    assert -ll == pytest.approx(r.nll_sum, rel=1e-5)


def _greedy_one_by_one(em, tok, prompt: str, max_gen: int) -> str:
    ids = tok.tokenize(prompt)[-(SEQ - max_gen):]
    out = []
    with torch.no_grad():
        for _ in range(max_gen):
            nxt = int(em.model(torch.tensor([ids + out]))[0, -1, :em.vocab_size].argmax())
            if nxt == tok.eod:
                break
            out.append(nxt)
    return tok.detokenize(out)


def test_batched_greedy_generation_equals_one_sequence_at_a_time(lm, em):
    prompts = ["In the beginning", "And God said, Let there be light: and there was",
               " ".join(["And the LORD spake unto Moses"] * 8)]
    kw = {"until": [], "max_gen_toks": 5, "do_sample": False}
    got = lm.generate_until([_req("generate_until", p, dict(kw)) for p in prompts])
    want = [_greedy_one_by_one(em, lm.tokenizer, p, 5) for p in prompts]
    assert got == want
    # a stop string cuts the text before it (and stops that row)
    text = want[1]
    stop = text[len(text) // 2:len(text) // 2 + 2]
    assert stop.strip()
    (cut,) = lm.generate_until([_req("generate_until", prompts[1], {**kw, "until": [stop]})])
    assert cut == text[:text.find(stop)]


def test_generate_until_uses_the_kv_cache_and_equals_rerunning(lm):
    """generate_until runs the KV-cache generator; its text equals the batched path that re-runs
    the whole sequence for every token (the adapter's former implementation), stop strings and
    end-of-document included."""
    assert lm._inference_model() is not None
    prompts = [lm.tok_encode(p) for p in ("In the beginning", "And God said", "")]
    ctx = [(p or [lm.prefix_token_id]) for p in prompts]
    for until, n in (([], 7), ([","], 9), (["the"], 6)):
        assert lm.greedy_generate(prompts, until, n) == lm._greedy_generate_full(ctx, until, n)


def test_sparsity_override_changes_measured_density(ckpt, lm):
    from megatron_qsparse.evaluation.lm_eval_adapter import QSparseLM

    req = [_req("loglikelihood", "In the beginning God created", " the heaven")]
    densities = {}
    for name, kwargs in (("trained", {}), ("0.75", {"sparsity": 0.75}),
                         ("dense", {"qsparse_mode": "none"})):
        m = QSparseLM(load=ckpt, batch_size=2, device="cpu", **kwargs)
        m.loglikelihood(req)
        densities[name] = m.density()
    assert densities["trained"]["kind/qkv"] == 0.5
    assert densities["0.75"]["kind/qkv"] == 0.25 and densities["0.75"]["kind/o"] == 0.25
    assert densities["dense"]["kind/qkv"] == 1.0
    with pytest.raises(ConfigError, match="unknown argument"):
        QSparseLM(load=ckpt, sparsty=0.5)


def test_local_tasks_run_through_lm_evals_evaluator_offline(lm, em, monkeypatch):
    from lm_eval.evaluator import simple_evaluate
    from lm_eval.tasks import TaskManager

    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    real_connect = socket.socket.connect

    def no_network(self, address):
        if self.family in (socket.AF_INET, socket.AF_INET6):
            raise AssertionError(f"network access to {address} during evaluation")
        return real_connect(self, address)

    monkeypatch.setattr(socket.socket, "connect", no_network)
    tm = TaskManager(include_path=str(ROOT / "examples" / "lm_eval_tasks"))
    out = simple_evaluate(model=lm, tasks=["qsparse_tiny_mc", "qsparse_tiny_gen",
                                           "qsparse_tiny_ppl"],
                          task_manager=tm, log_samples=True, bootstrap_iters=0)
    res = out["results"]
    assert 0.0 <= res["qsparse_tiny_mc"]["acc,none"] <= 1.0
    assert 0.0 <= res["qsparse_tiny_gen"]["exact_match,none"] <= 1.0
    # accuracy recomputed from the logged per-choice log-likelihoods
    samples = out["samples"]["qsparse_tiny_mc"]
    assert len(samples) == 12
    acc = np.mean([int(np.argmax([r[0][0] for r in s["resps"]]) == s["target"])
                   for s in samples])
    assert res["qsparse_tiny_mc"]["acc,none"] == pytest.approx(acc)
    # bits per byte of the rolling task = -sum(rolling log-likelihood) / ln 2 / bytes
    docs = [s["doc"]["text"] for s in out["samples"]["qsparse_tiny_ppl"]]
    assert max(len(lm.tok_encode(t)) for t in docs) > SEQ  # several windows
    nll = -sum(lm.loglikelihood_rolling([_req("loglikelihood_rolling", t) for t in docs]))
    nbytes = sum(len(t.encode("utf-8")) for t in docs)
    assert res["qsparse_tiny_ppl"]["bits_per_byte,none"] == pytest.approx(
        nll / math.log(2) / nbytes, rel=1e-5)


# ------------------------------------------------------------------------------ the paper's table


def test_paper_table_layout(tmp_path):
    from megatron_qsparse.evaluation.table import PAPER_TASKS, markdown_table

    scores = {"dense": [0.60, 0.80, 0.75, 0.62, 0.45], "qs": [0.58, 0.79, 0.74, 0.60, 0.46]}
    for run, vals in scores.items():
        for (col, task, shots, metric), v in zip(PAPER_TASKS, vals):
            d = tmp_path / run / task / "model__x"
            d.mkdir(parents=True)
            (d / "results_2026.json").write_text(__import__("json").dumps(
                {"results": {task: {metric: v, "other,none": 0.0}}}))
            act = 7.0e9 if run == "dense" else 3.8e9
            (tmp_path / run / task / "qsparse_summary.json").write_text(__import__("json").dumps(
                {"activated_parameters": act, "non_embedding_parameters": 7_000_000_000}))
    (tmp_path / "part" / "mmlu").mkdir(parents=True)
    table = markdown_table([("Dense", str(tmp_path / "dense")),
                            ("Q-Sparse S=0.4", str(tmp_path / "qs")),
                            ("partial", str(tmp_path / "part"))]).splitlines()
    assert table[0] == ("| Model | Activated params | ARC-C | HellaSwag | WinoGrande | MMLU | "
                        "TruthfulQA | Avg |")
    assert table[2] == "| Dense | 7.00B (100%) | 60.0 | 80.0 | 75.0 | 62.0 | 45.0 | 64.4 |"
    assert table[3] == "| Q-Sparse S=0.4 | 3.80B (54%) | 58.0 | 79.0 | 74.0 | 60.0 | 46.0 | 63.4 |"
    assert table[4] == "| partial | – | – | – | – | – | – | – |"
