#!/usr/bin/env bash
# The benchmark suite of the Q-Sparse paper on one checkpoint, through lm-evaluation-harness with
# our `qsparse` model: ARC-Challenge (25-shot, acc_norm), HellaSwag (10-shot, acc_norm),
# WinoGrande (5-shot, acc), MMLU (5-shot, acc), TruthfulQA mc2 (0-shot) — the Open LLM
# Leaderboard (v1) settings. Each task writes lm_eval's results and our measured density /
# activated parameters under $OUT/<task>/; `tools/evaluate.py table` lays several runs out as the
# paper's table. The datasets come from the Hugging Face Hub (or its cache, HF_DATASETS_OFFLINE=1).
#
#   CKPT=ckpt/qsparse-s40 OUT=eval/qs40 bash examples/eval_paper_suite.sh
#   CKPT=ckpt/dense OUT=eval/dense bash examples/eval_paper_suite.sh
#   CKPT=ckpt/qsparse-s40 SPARSITY=0.6 OUT=eval/qs40-at-60 bash examples/eval_paper_suite.sh
#   .venv/bin/python tools/evaluate.py table --run Dense=eval/dense --run "Q-Sparse S=0.4=eval/qs40"
#
# Environment:
#   CKPT            checkpoint (save directory or iter_* folder)                      [required]
#   OUT             output folder                             [default: build/eval/$(basename CKPT)]
#   SPARSITY        override the trained sparsity ratio S of every projection  [default: as trained]
#   QSPARSE_MODE    override the sparsifier: topk, block, relu, none           [default: as trained]
#   TOKENIZER_MODEL the checkpoint's SentencePiece model if its stored path moved
#   TASKS           subset, e.g. "arc_challenge hellaswag"; other tasks as NAME:SHOTS [all five]
#   INCLUDE_PATH    folder of extra task YAMLs for lm_eval (e.g. examples/lm_eval_tasks)
#   BATCH_SIZE      requests per forward pass                                              [8]
#   DEVICE          cpu, cuda, cuda:0, ...                                [default: cuda if any]
#   DTYPE           float32 or bfloat16                                              [float32]
#   LIMIT           examples per task, for a quick look (not comparable results)     [all]
#   PY              python interpreter                                       [.venv/bin/python]
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
: "${CKPT:?set CKPT to the checkpoint to evaluate, e.g. CKPT=ckpt/ bash $0}"
OUT=${OUT:-build/eval/$(basename "$CKPT")}
TASKS=${TASKS:-"arc_challenge hellaswag winogrande mmlu truthfulqa_mc2"}
BATCH_SIZE=${BATCH_SIZE:-8}
DTYPE=${DTYPE:-float32}

declare -A SHOTS=([arc_challenge]=25 [hellaswag]=10 [winogrande]=5 [mmlu]=5 [truthfulqa_mc2]=0)

MODEL_ARGS="load=$CKPT,dtype=$DTYPE"
[ -n "${SPARSITY:-}" ] && MODEL_ARGS="$MODEL_ARGS,sparsity=$SPARSITY"
[ -n "${QSPARSE_MODE:-}" ] && MODEL_ARGS="$MODEL_ARGS,qsparse_mode=$QSPARSE_MODE"
[ -n "${TOKENIZER_MODEL:-}" ] && MODEL_ARGS="$MODEL_ARGS,tokenizer_model=$TOKENIZER_MODEL"
EXTRA=()
[ -n "${DEVICE:-}" ] && EXTRA+=(--device "$DEVICE")
[ -n "${LIMIT:-}" ] && EXTRA+=(--limit "$LIMIT")
[ -n "${INCLUDE_PATH:-}" ] && EXTRA+=(--include_path "$INCLUDE_PATH")

for item in $TASKS; do
  task=${item%%:*}
  shots=${SHOTS[$task]:-}
  [ "$item" != "$task" ] && shots=${item#*:}
  if [ -z "$shots" ]; then
    echo "TASKS: no few-shot count for '$task'; write it as $task:SHOTS or choose from ${!SHOTS[*]}" >&2
    exit 2
  fi
  echo "==> $task ($shots-shot) on $CKPT -> $OUT/$task"
  mkdir -p "$OUT/$task"
  "$PY" tools/evaluate.py lm-eval --summary-json "$OUT/$task/qsparse_summary.json" \
    --model qsparse --model_args "$MODEL_ARGS" --tasks "$task" --num_fewshot "$shots" \
    --batch_size "$BATCH_SIZE" --output_path "$OUT/$task" "${EXTRA[@]}"
done
echo "==> table row"
"$PY" tools/evaluate.py table --run "$(basename "$CKPT")=$OUT"
