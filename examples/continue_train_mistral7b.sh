#!/usr/bin/env bash
# Continue-train Mistral-7B into a Q-Sparse model on FineWeb-Edu — the paper's recipe:
#   * top-K on the input of every projection; in the FFN after the SwiGLU activation (the down
#     projection's input), so the architecture is unchanged (--ffn-type swiglu, from the import);
#   * the sparsity ratio ramps up from 0 (--qsparse-warmup-iters) so the dense model is not shocked;
#   * batches of 4M tokens (1024 sequences x 4096), lr 5e-5, AdamW, weight decay 0.01, 40B tokens.
# The paper gives no schedule beyond the lr: we use a short warm-up and cosine decay to 10%.
# Its sparse Mistral-7B has ~40% sparsity on q/k/v/o/gate/up and ~60% on down (3.8B activated).
#
# Steps: import the Hugging Face checkpoint (once), tokenize FineWeb-Edu with Mistral's
# tokenizer (once), train (resumes from CKPT/train when it holds a checkpoint), export to HF.
# Settings come from environment variables (defaults below); extra flags go to
# pretrain_qsparse.py, e.g.  NUM_GPUS=8 TP=2 bash examples/continue_train_mistral7b.sh --bf16
set -euo pipefail
cd "$(dirname "$0")/.."

PY=${PY:-python}
HF_DIR=${HF_DIR:-checkpoints/hf/Mistral-7B-v0.1}       # config.json, *.safetensors, tokenizer.model
TOKENIZER=${TOKENIZER:-$HF_DIR/tokenizer.model}
CORPUS=${CORPUS:-data/fineweb-edu}                       # Parquet (as on the Hub) or jsonl(.gz/.zst): files, dirs, globs
DATA=${DATA:-data/fineweb_edu_mistral}                   # output prefix of the tokenized corpus
CKPT=${CKPT:-checkpoints/mistral7b-qsparse}
NUM_GPUS=${NUM_GPUS:-8}
NUM_NODES=${NUM_NODES:-1}
HOSTFILE=${HOSTFILE:-}                                   # for multi-node runs
TP=${TP:-2}
SEQ=${SEQ:-4096}
MICRO_BATCH=${MICRO_BATCH:-1}
GLOBAL_BATCH=${GLOBAL_BATCH:-1024}                       # 1024 x 4096 = 4.19M tokens per step
TRAIN_ITERS=${TRAIN_ITERS:-9537}                         # 40B tokens / 4.19M
LR_WARMUP=${LR_WARMUP:-100}
LR=${LR:-5e-5}
SPARSITY=${SPARSITY:-0.4}
DOWN_SPARSITY=${DOWN_SPARSITY:-0.6}
SPARSITY_WARMUP=${SPARSITY_WARMUP:-500}
WORKERS=${WORKERS:-16}

if [ ! -f "$CKPT/init/latest" ]; then
  echo "==> importing $HF_DIR (TP=$TP)"
  "$PY" tools/checkpoint_convert.py import-hf --hf-dir "$HF_DIR" --save "$CKPT/init" \
    --target-tensor-parallel-size "$TP" --tokenizer-model "$TOKENIZER" --dtype bfloat16 \
    --seq-length "$SEQ"
fi

if [ ! -f "${DATA}_text_document.idx" ]; then
  echo "==> tokenizing $CORPUS"
  "$PY" tools/preprocess_data.py --input "$CORPUS" --output-prefix "$DATA" \
    --tokenizer-type SentencePieceTokenizer --tokenizer-model "$TOKENIZER" \
    --append-eod --workers "$WORKERS"
fi

if [ -f "$CKPT/train/latest" ]; then
  LOAD=(--load "$CKPT/train")                            # resume (optimizer, data position, RNG)
else
  LOAD=(--load "$CKPT/init" --finetune)                  # start from the imported weights
fi
LAUNCH=(deepspeed --num_gpus "$NUM_GPUS" --num_nodes "$NUM_NODES")
[ -n "$HOSTFILE" ] && LAUNCH+=(--hostfile "$HOSTFILE")

echo "==> continue-training"
"${LAUNCH[@]}" pretrain_qsparse.py --config "$CKPT/init/model_args.yaml" "${LOAD[@]}" \
  --save "$CKPT/train" --save-interval 500 \
  --tensor-model-parallel-size "$TP" --zero-stage 1 --bf16 \
  --seq-length "$SEQ" --micro-batch-size "$MICRO_BATCH" --global-batch-size "$GLOBAL_BATCH" \
  --train-iters "$TRAIN_ITERS" --lr "$LR" --min-lr "$(
    "$PY" -c "print($LR / 10)")" --lr-warmup-iters "$LR_WARMUP" --lr-decay-style cosine \
  --weight-decay 0.01 --adam-beta1 0.9 --adam-beta2 0.95 --clip-grad 1.0 \
  --qsparse-mode topk --qsparse-ratio "$SPARSITY" --qsparse-down-ratio "$DOWN_SPARSITY" \
  --qsparse-warmup-iters "$SPARSITY_WARMUP" \
  --data-path "${DATA}_text_document" --split 998,2,0 \
  --tokenizer-type SentencePieceTokenizer --tokenizer-model "$TOKENIZER" \
  --eval-interval 500 --eval-iters 20 --log-interval 10 --tensorboard-dir "$CKPT/tensorboard" \
  "$@"

echo "==> exporting to $CKPT/hf"
rm -rf "$CKPT/hf"
"$PY" tools/checkpoint_convert.py export-hf --load "$CKPT/train" --save "$CKPT/hf" --dtype bfloat16
