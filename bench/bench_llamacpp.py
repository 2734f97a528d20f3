#!/usr/bin/env python
"""Decode speed against llama.cpp on the same model, and greedy-token agreement with it.

llama.cpp is an optional, benchmark-only dependency: pass a built ``llama-bench`` with
``--llama-bench PATH``, or let ``--build-llamacpp DIR`` build it from the llama-cpp-python 0.3.36
source distribution (the recipe of ../shared/VERIFIED.md, below). Without either the script says
why and exits 0.

**Speed** (a random-weight LLaMA, 8 layers, hidden 2048, FFN 5632 SwiGLU,
16 heads / 4 KV heads, vocabulary 4096 (our SentencePiece tokenizer), untied head; 377 M
parameters): our checkpoint is written, exported to Hugging Face by ``tools/checkpoint_convert.py
export-hf`` and converted by llama.cpp's ``convert_hf_to_gguf.py`` to f32, f16, bf16 and q8_0.
``llama-bench -m M.gguf -p 0 -n TOKENS -t THREADS`` gives llama.cpp's decode tokens/s. Ours: the
same weights through the same generator API as ``tools/generate.py`` (:func:`generate`, greedy,
the compiled decode step), dense (S = 0) and Q-Sparse Top-K at S = 0.4 ... 0.7 (the sparsity is
an inference setting on the same weights: random weights decode as fast as trained ones), with
decode weights fp32, 16-bit (fp16 and bf16) and int8 (per-output-channel scales). Each row
compares with llama.cpp's *dense* decode at the same precision (16-bit: the faster of its f16 and
bf16; 8-bit: q8_0), and gives the bandwidth it reached: weight bytes actually read per token
(every kept row of every projection, the LM head, the KV cache) x tokens/s, over a STREAM-like
read (:func:`~megatron_qsparse.inference.cpu_kernels.stream_read`, 1 GB, same threads); llama.cpp's
bytes are its file's matrices (the embedding row is one row a token). The machine's memory
bandwidth drifts, so every row of ours is bracketed by a run of llama.cpp's reference file and a
STREAM-like read just before and just after it, and is compared with their means.

**Agreement**: a tiny dense SwiGLU model is trained for a few steps by ``pretrain_qsparse.py``,
exported by us, converted to an f32 GGUF, and both decoders generate greedily from the same
prompt ids; a small C program against ``libllama`` (built here, beside the binary) prints
llama.cpp's token ids. The tokens must be identical (they are compared, not the text). On the
same trained model, the held-out perplexity with the weights as each decode dtype stores them
(``tools/evaluate.py perplexity --decode-weight-dtype``), dense and at S = 0.6: the accuracy cost
of 16-bit and int8 weights.

Usage::

  python bench/bench_llamacpp.py --build-llamacpp build/llamacpp        # build, then bench
  python bench/bench_llamacpp.py --llama-bench PATH/llama-bench [--quick]
  python bench/bench_llamacpp.py --llama-bench PATH --skip-speed        # agreement only

``--quick``: a 2-layer, width-256 model, S = 0 and 0.6, 16 tokens: checks that everything works
in about a minute. The default run takes ~8 minutes on the 2-core development machine.
``--alternations N`` times each row N times, each time bracketed, and reports medians: the
verdict run ``--ratios 0 0.6 --alternations 5 --skip-agreement`` takes ~10 minutes.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tarfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import torch  # noqa: E402

SDIST = "llama-cpp-python==0.3.36"
CMAKE_FLAGS = ["-DCMAKE_BUILD_TYPE=Release", "-DGGML_NATIVE=ON", "-DLLAMA_CURL=OFF",
               "-DLLAMA_BUILD_TESTS=OFF"]
TOKENIZER = os.path.join(ROOT, "examples", "data", "kjv_sp4k.model")
PRECISIONS = {  # ours: (label, decode weight dtype); llama.cpp: its file types
    "fp32": ([("fp32", None)], ["f32"]),
    "16-bit": ([("fp16", torch.float16), ("bf16", torch.bfloat16)], ["f16", "bf16"]),
    "8-bit": ([("int8", torch.int8)], ["q8_0"]),
}


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def run(cmd: list[str], **kw) -> subprocess.CompletedProcess:
    log("$ " + " ".join(cmd))
    return subprocess.run(cmd, check=True, **kw)


# ---------------------------------------------------------------------------------------------
# llama.cpp: find or build


def build_llamacpp(folder: str, jobs: int) -> str:
    """Download the llama-cpp-python source distribution into ``folder`` (pip, no binaries),
    unpack it, and build ``llama-bench`` and ``llama-simple`` of its vendored llama.cpp with cmake
    (``-j jobs``, niced). Returns the llama-bench path."""
    folder = os.path.abspath(folder)
    sdist = os.path.join(folder, "sdist")
    archives = glob.glob(os.path.join(sdist, "llama_cpp_python-*.tar.gz"))
    if not archives:
        run([sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:", SDIST,
             "-d", sdist])
        archives = glob.glob(os.path.join(sdist, "llama_cpp_python-*.tar.gz"))
    src = os.path.join(folder, os.path.basename(archives[0])[:-len(".tar.gz")])
    if not os.path.isdir(src):
        with tarfile.open(archives[0]) as tf:
            tf.extractall(folder)
    llama = os.path.join(src, "vendor", "llama.cpp")
    binary = os.path.join(llama, "build", "bin", "llama-bench")
    if not os.path.exists(binary):
        nice = ["nice", "-n", "19"] if shutil.which("nice") else []
        run(nice + ["cmake", "-B", "build", *CMAKE_FLAGS], cwd=llama)
        run(nice + ["cmake", "--build", "build", "--target", "llama-bench", "llama-simple",
                    "-j", str(jobs)], cwd=llama)
    return binary


def llama_root(binary: str) -> str | None:
    """The llama.cpp source folder above a built binary (holding convert_hf_to_gguf.py)."""
    d = os.path.dirname(os.path.abspath(binary))
    for _ in range(5):
        if os.path.exists(os.path.join(d, "convert_hf_to_gguf.py")):
            return d
        d = os.path.dirname(d)
    return None


TOKENS_C = r"""
// Greedy decoding with llama.cpp from given token ids; prints the generated ids.
#include <stdio.h>
#include <stdlib.h>
#include "llama.h"
static void quiet(enum ggml_log_level l, const char* t, void* u) { (void)l; (void)t; (void)u; }
int main(int argc, char** argv) {
  if (argc < 5) { fprintf(stderr, "usage: %s MODEL N THREADS ID...\n", argv[0]); return 2; }
  llama_log_set(quiet, NULL);
  llama_backend_init();
  struct llama_model_params mp = llama_model_default_params();
  mp.n_gpu_layers = 0;
  struct llama_model* model = llama_model_load_from_file(argv[1], mp);
  if (!model) { fprintf(stderr, "cannot load %s\n", argv[1]); return 1; }
  int n = atoi(argv[2]), np = argc - 4;
  struct llama_context_params cp = llama_context_default_params();
  cp.n_ctx = np + n + 8; cp.n_batch = np + n + 8; cp.n_threads = cp.n_threads_batch = atoi(argv[3]);
  struct llama_context* ctx = llama_init_from_model(model, cp);
  int nv = llama_vocab_n_tokens(llama_model_get_vocab(model));
  llama_token* ids = malloc(sizeof(llama_token) * (np + n));
  for (int i = 0; i < np; ++i) ids[i] = atoi(argv[4 + i]);
  struct llama_batch b = llama_batch_get_one(ids, np);
  for (int t = 0; t < n; ++t) {
    if (llama_decode(ctx, b)) { fprintf(stderr, "decode failed\n"); return 1; }
    const float* lg = llama_get_logits_ith(ctx, -1);
    int best = 0;
    for (int v = 1; v < nv; ++v) if (lg[v] > lg[best]) best = v;
    printf("%d%s", best, t + 1 < n ? " " : "\n");
    ids[np + t] = best;
    b = llama_batch_get_one(ids + np + t, 1);
  }
  llama_free(ctx); llama_model_free(model);
  return 0;
}
"""


def build_tokens_tool(root: str, bindir: str, work: str) -> str:
    """Compile the greedy-ids program above against the built libllama."""
    out = os.path.join(work, "llama-greedy-ids")
    if not os.path.exists(out):
        src = os.path.join(work, "llama_greedy_ids.c")
        with open(src, "w") as fh:
            fh.write(TOKENS_C)
        run(["cc", "-O2", src, "-o", out, f"-I{root}/include", f"-I{root}/ggml/include",
             f"-L{bindir}", "-lllama", f"-Wl,-rpath,{bindir}"])
    return out


# ---------------------------------------------------------------------------------------------
# models and files


def model_config(quick: bool):
    from megatron_qsparse.config import Config

    cfg = Config()
    m = cfg.model
    if quick:
        m.num_layers, m.hidden_size, m.ffn_hidden_size = 2, 256, 704
        m.num_attention_heads, m.num_query_groups = 4, 2
    else:  # the 378M comparison model
        m.num_layers, m.hidden_size, m.ffn_hidden_size = 8, 2048, 5632
        m.num_attention_heads, m.num_query_groups = 16, 4
    m.seq_length, m.max_position_embeddings, m.vocab_size = 512, 512, 4096
    m.ffn_type, m.normalization = "swiglu", "RMSNorm"
    m.untie_embeddings_and_output_weights = True
    cfg.qsparse.mode = "none"
    cfg.data.tokenizer_type, cfg.data.tokenizer_model = "SentencePieceTokenizer", TOKENIZER
    cfg.data.data_path = ["unused"]
    return cfg


def write_random_checkpoint(save: str, cfg) -> dict:
    from megatron_qsparse.config import padded_vocab_size
    from megatron_qsparse.convert.layout import write_checkpoint
    from megatron_qsparse.model.gpt import GPTModel

    torch.manual_seed(0)
    model = GPTModel(cfg.model, padded_vocab_size(cfg.model.vocab_size, cfg))
    state = {k: v.detach() for k, v in model.state_dict().items()}
    if not os.path.exists(os.path.join(save, "latest")):
        write_checkpoint(save, cfg, lambda: iter(state.items()))
    return state


def export_and_convert(ckpt: str, work: str, root: str, types: list[str]) -> dict[str, str]:
    """Our checkpoint -> HF (our exporter) -> GGUF of each type (llama.cpp's converter)."""
    hf = os.path.join(work, "hf")
    if not os.path.exists(os.path.join(hf, "config.json")):
        run([sys.executable, os.path.join(ROOT, "tools", "checkpoint_convert.py"), "export-hf",
             "--load", ckpt, "--save", hf], stdout=subprocess.DEVNULL)
    env = dict(os.environ, PYTHONPATH=os.path.join(root, "gguf-py"))
    out = {}
    for t in types:
        path = os.path.join(work, f"model-{t}.gguf")
        if not os.path.exists(path):
            run([sys.executable, os.path.join(root, "convert_hf_to_gguf.py"), hf, "--outtype", t,
                 "--outfile", path], env=env, stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL)
        out[t] = path
    return out


def llama_bench(binary: str, gguf: str, tokens: int, threads: int, repeats: int) -> float:
    res = run([binary, "-m", gguf, "-p", "0", "-n", str(tokens), "-t", str(threads),
               "-r", str(repeats), "-o", "json"], capture_output=True, text=True)
    rows = json.loads(res.stdout)
    return float(rows[0]["avg_ts"])


def gguf_matrix_bytes(path: str, root: str) -> int:
    """Bytes llama.cpp reads per token: every tensor but the token embedding (one row a token)."""
    sys.path.insert(0, os.path.join(root, "gguf-py"))
    from gguf import GGUFReader

    r = GGUFReader(path)
    return sum(int(t.n_bytes) for t in r.tensors if t.name != "token_embd.weight")


# ---------------------------------------------------------------------------------------------
# ours


def bytes_per_token(im, cache_len: int) -> int:
    """Weight bytes a decode step reads: the kept rows of each projection (its K, or all for
    dense; int8 scales included), the LM head, and the KV cache up to ``cache_len``."""
    head = im.head_wt if im.head_wt is not None else im.model.output_weight()
    return (sum(bytes_by_projection(im).values()) + head.numel() * head.element_size()
            + 2 * im.num_layers * im.nkv * im.hd * cache_len * 4)


def bytes_by_projection(im) -> dict[str, int]:
    """Weight bytes a decode step reads per projection kind (qkv, o, gate_up, down; the last
    part of the module name): the kept rows and int8 scales, all layers (and experts)."""
    from megatron_qsparse.inference.linear import DecodeLinear

    out: dict[str, int] = {}
    for name, m in im.model.named_modules():
        if isinstance(m, DecodeLinear):
            sp = m.sparsifier
            k = sp.keep(m.in_features) if sp is not None else 0
            rows = m.in_features if not isinstance(k, int) or k == 0 else k
            kind = name.rsplit(".", 1)[-1]
            byt = rows * m.out_features * m.wt.element_size()
            if m.scale is not None:
                byt += m.scale.numel() * 4
            out[kind] = out.get(kind, 0) + byt
    return out


def build_ours(state, cfg, s, weight_dtype, prompt):
    """Our decoder at sparsity ``s`` on the benchmark's weights, warmed up (threads, pages)."""
    from megatron_qsparse.config import QSparseConfig, padded_vocab_size
    from megatron_qsparse.inference import InferenceModel, generate
    from megatron_qsparse.model.gpt import GPTModel

    vocab = padded_vocab_size(cfg.model.vocab_size, cfg)
    q = QSparseConfig(mode="none") if s == 0 else QSparseConfig(mode="topk", ratio=s)
    m = GPTModel(cfg.model.with_sparsity(q), vocab)
    m.load_state_dict(state)
    im = InferenceModel(m.eval(), weight_dtype=weight_dtype)
    assert im.step is not None, im.step_unavailable
    generate(im, prompt, 4)
    return im


def time_ours(im, prompt, tokens, repeats) -> float:
    """Median decode tok/s of ``repeats`` greedy generations of ``tokens`` tokens."""
    from megatron_qsparse.inference import generate

    return statistics.median(generate(im, prompt, tokens + 1).decode_tokens_per_second
                             for _ in range(repeats))


def profile_ours(im, prompt, tokens) -> dict:
    """ms per decode step by phase (one more generation, profiled), and ``bytes``: the weight
    bytes by projection."""
    from megatron_qsparse.inference import generate

    profile = generate(im, prompt, tokens + 1, profile=True).profile
    profile["bytes"] = bytes_by_projection(im)
    return profile


def stream_bandwidth(repeats: int = 5) -> float:
    from megatron_qsparse.inference import cpu_kernels

    a = torch.ones(1 << 28)  # 1 GB
    cpu_kernels.stream_read(a)
    ts = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        cpu_kernels.stream_read(a)
        ts.append(time.perf_counter() - t0)
    return a.numel() * 4 / statistics.median(ts) / 1e9


# ---------------------------------------------------------------------------------------------
# greedy-token agreement on a trained SwiGLU model


def train_tiny(work: str, threads: int) -> str:
    """A dense SwiGLU model trained a few steps by pretrain_qsparse.py on the sample corpus."""
    save = os.path.join(work, "trained")
    if os.path.exists(os.path.join(save, "latest")):
        return save
    data = os.path.join(work, "data")
    os.makedirs(data, exist_ok=True)
    prefix = os.path.join(data, "kjv")
    if not os.path.exists(prefix + "_text_document.bin"):
        corpus = os.path.join(ROOT, "examples", "data", "kjv_sample.jsonl")
        run([sys.executable, os.path.join(ROOT, "tools", "preprocess_data.py"), "--input", corpus,
             "--output-prefix", prefix, "--tokenizer-type", "SentencePieceTokenizer",
             "--tokenizer-model", TOKENIZER, "--append-eod", "--workers", "1"],
            stdout=subprocess.DEVNULL)
    cmd = [sys.executable, os.path.join(ROOT, "pretrain_qsparse.py"),
           "--num-layers", "2", "--hidden-size", "128", "--ffn-hidden-size", "352",
           "--num-attention-heads", "4", "--num-query-groups", "2", "--seq-length", "64",
           "--max-position-embeddings", "128", "--ffn-type", "swiglu",
           "--untie-embeddings-and-output-weights", "--qsparse-mode", "none",
           "--micro-batch-size", "8", "--global-batch-size", "8", "--train-iters", "150",
           "--lr", "3e-3", "--min-lr", "3e-4", "--lr-warmup-iters", "5",
           "--data-path", prefix + "_text_document", "--split", "98,2,0",
           "--tokenizer-type", "SentencePieceTokenizer", "--tokenizer-model", TOKENIZER,
           "--save", save, "--save-interval", "150", "--eval-interval", "1000",
           "--log-interval", "20", "--eval-iters", "1", "--seed", "1",
           "--data-cache-path", os.path.join(work, "cache")]
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), DS_ACCELERATOR="cpu")
    run(cmd, env=env, stdout=subprocess.DEVNULL)
    return save


def agreement(work: str, root: str, bindir: str, threads: int, tokens: int) -> bool:
    from megatron_qsparse.data.tokenizer import build_tokenizer
    from megatron_qsparse.inference import generate, load_inference_model

    ckpt = train_tiny(work, threads)
    gguf = export_and_convert(ckpt, os.path.join(work, "trained-files"), root, ["f32"])["f32"]
    tool = build_tokens_tool(root, bindir, work)
    tok = build_tokenizer("SentencePieceTokenizer", TOKENIZER)
    ok = True
    for text in ("In the beginning God created", "And the LORD spake unto Moses, saying"):
        prompt = tok.tokenize(text)
        res = run([tool, gguf, str(tokens), str(threads), *map(str, prompt)],
                  capture_output=True, text=True)
        theirs = [int(t) for t in res.stdout.split()]
        lines = []
        for compiled in (True, False):
            im, _ = load_inference_model(ckpt, compiled_step=compiled)
            ours = generate(im, prompt, tokens).tokens
            same = ours == theirs
            ok &= same
            first = next((i for i, (a, b) in enumerate(zip(ours, theirs)) if a != b), None)
            lines.append(f"  ours ({'compiled step' if compiled else 'layer by layer'}): "
                         f"{'identical' if same else f'differs from token {first}'}")
        print(f"prompt {text!r} ({len(prompt)} ids), {tokens} greedy tokens:")
        print(f"  llama.cpp f32: {tok.detokenize(theirs)!r}")
        print("\n".join(lines))
    print(f"greedy-token agreement with llama.cpp: {'PASS' if ok else 'FAIL'}\n")
    return ok


def perplexity_delta(work: str, threads: int, ratios=(0.0, 0.6)) -> None:
    """Held-out perplexity of the trained model with its weights as each decode dtype holds them
    (``tools/evaluate.py perplexity --decode-weight-dtype``), dense and at Q-Sparse S = 0.6."""
    ckpt = train_tiny(work, threads)
    data = os.path.join(work, "data", "kjv_text_document")
    print("| decode weights | S | held-out perplexity | Δ vs fp32 |")
    print("|---|---:|---:|---:|")
    for s in ratios:
        base = None
        for w in ("model", "bfloat16", "float16", "int8"):
            out = os.path.join(work, f"ppl-{w}-{s}.json")
            cmd = [sys.executable, os.path.join(ROOT, "tools", "evaluate.py"), "perplexity",
                   "--load", ckpt, "--data-path", data, "--split-name", "valid",
                   "--max-tokens", "20000", "--decode-weight-dtype", w, "--json", out]
            if s > 0:
                cmd += ["--qsparse-mode", "topk", "--qsparse-ratio", str(s)]
            run(cmd, stdout=subprocess.DEVNULL, env=dict(os.environ, OMP_NUM_THREADS=str(threads)))
            with open(out) as fh:
                ppl = json.load(fh)["perplexity"]
            base = ppl if base is None else base
            name = "fp32" if w == "model" else w
            print(f"| {name} | {s:.1f} | {ppl:.4f} | {ppl - base:+.4f} ({ppl / base - 1:+.3%}) |",
                  flush=True)
    print()


# ---------------------------------------------------------------------------------------------


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--llama-bench", default=None, help="A built llama.cpp llama-bench binary.")
    p.add_argument("--build-llamacpp", default=None, metavar="DIR",
                   help=f"Build llama-bench from the {SDIST} source distribution into DIR "
                        "(reused when already built there).")
    p.add_argument("--build-jobs", type=int, default=1, help="cmake -j for --build-llamacpp.")
    p.add_argument("--work", default=os.path.join(ROOT, "build", "bench_llamacpp"),
                   help="Folder for checkpoints, exports and GGUF files (reused).")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--tokens", type=int, default=64, help="Decode tokens per measurement.")
    p.add_argument("--repeats", type=int, default=3, help="Generations (ours) / llama-bench -r.")
    p.add_argument("--alternations", type=int, default=1,
                   help="Times each row of ours is timed, each time followed by llama.cpp and "
                        "the STREAM-like read; the row reports medians over them (5 for "
                        "verdicts on a drifting machine, e.g. with --ratios 0 0.6).")
    p.add_argument("--ratios", type=float, nargs="+", default=[0.0, 0.4, 0.5, 0.6, 0.7])
    p.add_argument("--precisions", nargs="+", default=list(PRECISIONS), choices=list(PRECISIONS))
    p.add_argument("--quick", action="store_true",
                   help="Small model, S = 0 and 0.6, 16 tokens, 1 repeat: checks it works.")
    p.add_argument("--skip-speed", action="store_true")
    p.add_argument("--skip-agreement", action="store_true",
                   help="Skip the greedy-token agreement and the perplexity deltas.")
    args = p.parse_args(argv)
    if args.alternations < 1:
        p.error(f"--alternations must be at least 1, got {args.alternations}")
    if args.quick:
        args.tokens, args.repeats = 16, 1
        if args.ratios == p.get_default("ratios"):
            args.ratios = [0.0, 0.6]

    binary = args.llama_bench
    if binary is None and args.build_llamacpp:
        binary = build_llamacpp(args.build_llamacpp, args.build_jobs)
    if binary is None:
        print("llama.cpp not given: pass --llama-bench PATH (a built llama-bench) or "
              "--build-llamacpp DIR to build it; nothing to compare with, exiting.")
        return 0
    if not os.path.exists(binary):
        print(f"--llama-bench: {binary} does not exist; nothing to compare with, exiting.")
        return 0
    root = llama_root(binary)
    if root is None:
        print(f"no convert_hf_to_gguf.py above {binary} (need the llama.cpp source tree the "
              "binary was built in); exiting.")
        return 0
    bindir = os.path.dirname(os.path.abspath(binary))
    torch.set_num_threads(args.threads)
    from megatron_qsparse.inference import cpu_kernels

    if not cpu_kernels.available():
        print(f"our decode kernels are unavailable ({cpu_kernels.unavailable_reason()}); exiting.")
        return 0
    work = os.path.join(args.work, "quick" if args.quick else "full")
    os.makedirs(work, exist_ok=True)
    print(f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, {args.threads} "
          f"threads, torch {torch.__version__}, kernel ISA {cpu_kernels.isa()} (int8 dense: "
          f"{cpu_kernels.int8_path()}); llama.cpp "
          f"{binary}\n")
    ok = True
    if not args.skip_agreement:
        ok = agreement(os.path.join(args.work, "agreement"), root, bindir, args.threads,
                       32 if not args.quick else 12)
        perplexity_delta(os.path.join(args.work, "agreement"), args.threads)
    if args.skip_speed:
        return 0 if ok else 1

    cfg = model_config(args.quick)
    ckpt = os.path.join(work, "ckpt")
    state = write_random_checkpoint(ckpt, cfg)
    n_params = sum(v.numel() for v in state.values())
    types = [t for name in args.precisions for t in PRECISIONS[name][1]]
    ggufs = export_and_convert(ckpt, work, root, types)
    stream = stream_bandwidth()
    theirs = {}
    for t in types:
        tps = llama_bench(binary, ggufs[t], args.tokens, args.threads, args.repeats)
        theirs[t] = (tps, gguf_matrix_bytes(ggufs[t], root) * tps / 1e9)
    m = cfg.model
    prompt = list(range(5, 21))
    print(f"model: {m.num_layers} layers, hidden {m.hidden_size}, FFN {m.ffn_hidden_size} "
          f"SwiGLU, {m.num_attention_heads}/{m.num_query_groups} heads, vocab {m.vocab_size}, "
          f"untied; {n_params / 1e6:.0f}M parameters; {len(prompt)}-token prompt, {args.tokens} "
          f"decode tokens, {args.threads} threads; STREAM-like read {stream:.1f} GB/s\n")
    print("llama.cpp (llama-bench -p 0 -n %d -t %d), each once:" % (args.tokens, args.threads))
    for t, (tps, gbs) in theirs.items():
        print(f"  {t:5} {tps:7.1f} tok/s  {gbs:5.1f} GB/s = {gbs / stream:.2f} of STREAM")
    print("\nEach row below is bracketed: llama.cpp's reference file and the STREAM-like read are "
          "timed right before and right after ours (the next timing's 'before' is this one's "
          "'after'), and each timing compares with their means, so that the machine's drift (its "
          "memory bandwidth moves by tens of percent within minutes) cancels"
          + (f"; each row is timed {args.alternations} times so, and gives the medians (the "
             "ratio's range in brackets)" if args.alternations > 1 else "") + ".\n")
    hdr = ("| precision | ours | S | ours tok/s | llama.cpp dense tok/s | ours / llama.cpp | "
           "ours GB/s | STREAM GB/s | of STREAM | llama.cpp of STREAM |")
    print(hdr)
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    summary = {}
    profiles = []
    for name in args.precisions:
        ours_list, their_types = PRECISIONS[name]
        best_t = max(their_types, key=lambda t: theirs[t][0])
        ref_bytes = gguf_matrix_bytes(ggufs[best_t], root)

        def bracket():
            return (llama_bench(binary, ggufs[best_t], args.tokens, args.threads, args.repeats),
                    stream_bandwidth())

        med = statistics.median
        for label, dtype in ours_list:
            before = bracket()
            for s in args.ratios:
                im = build_ours(state, cfg, s, dtype, prompt)
                byt = bytes_per_token(im, len(prompt) + args.tokens // 2)
                runs = []  # (ours tok/s, llama.cpp tok/s, STREAM GB/s) per alternation
                for _ in range(args.alternations):
                    tps = time_ours(im, prompt, args.tokens, args.repeats)
                    after = bracket()
                    runs.append((tps, (before[0] + after[0]) / 2, (before[1] + after[1]) / 2))
                    before = after
                profiles.append((name, label, s, profile_ours(im, prompt, args.tokens)))
                del im
                ratios = sorted(t / r for t, r, _ in runs)
                ratio = med(ratios)
                spread = f" ({ratios[0]:.2f}-{ratios[-1]:.2f})" if len(runs) > 1 else ""
                tps, ref, st = (med(r[i] for r in runs) for i in range(3))
                frac = med(byt * t / 1e9 / b for t, _, b in runs)
                their_frac = med(ref_bytes * r / 1e9 / b for _, r, b in runs)
                print(f"| {name} | {label} | {s:.1f} | {tps:.1f} | {ref:.1f} ({best_t}) | "
                      f"{ratio:.2f}×{spread} | {byt * tps / 1e9:.1f} | {st:.1f} | {frac:.2f} | "
                      f"{their_frac:.2f} |", flush=True)
                key = (name, s)
                summary[key] = max(summary.get(key, 0.0), ratio)
    print("\nWhere our decode step's time goes (one more generation per row, profiled: "
          "generate(profile=True), as tools/generate.py --profile), ms per step:\n")
    phases = ("select", "products", "reduce", "head", "attention", "activation", "other", "wait")
    print("| precision | ours | S | step | " + " | ".join(phases) + " |")
    print("|---|---|---:|---:|" + "---:|" * len(phases))
    for name, label, s, prof in profiles:
        print(f"| {name} | {label} | {s:.1f} | {prof['step']:.3f} | "
              + " | ".join(f"{prof[k]:.3f}" for k in phases) + " |")
    print("\n(reduce: the calling thread's share of adding the row-group partial sums, inside "
          "products and head; wait: the calling thread waiting for the other threads' last work "
          "units, inside the other phases)")
    kinds = ("qkv", "o", "gate_up", "down")
    print("\nThe products by projection, ms per step and the GB/s of their weight reads:\n")
    print("| precision | ours | S | " + " | ".join(kinds) + " |")
    print("|---|---|---:|" + "---:|" * len(kinds))
    for name, label, s, prof in profiles:
        cells = [f"{prof[k]:.3f} ms, {prof['bytes'].get(k, 0) / prof[k] / 1e6:.1f} GB/s"
                 if prof[k] > 0 else "-" for k in kinds]
        print(f"| {name} | {label} | {s:.1f} | " + " | ".join(cells) + " |")
    print()
    for name in args.precisions:
        d = summary.get((name, 0.0))
        sp = summary.get((name, 0.6))
        parts = []
        if d is not None:
            parts.append(f"dense {d:.3f}× (target ≥ 1.0: {'PASS' if d >= 1.0 else 'FAIL'})")
        if sp is not None:
            parts.append(f"S=0.6 {sp:.3f}× (target ≥ 2.5: {'PASS' if sp >= 2.5 else 'FAIL'})")
        print(f"{name}: " + "; ".join(parts))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
