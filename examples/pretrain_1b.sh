#!/usr/bin/env bash
# Q-Sparse ~1.1B (LLaMA shape) from scratch on one node of 8 GPUs: data parallel with ZeRO-1,
# bf16, top-K S = 0.4 on every projection, squared-ReLU GLU FFN.
#
# Environment variables (defaults in brackets); nothing is positional:
#   DATA       preprocessed dataset prefix or weighted blend            (required)
#   TOKENIZER  SentencePiece tokenizer.model                            (required)
#   SAVE [checkpoints/qsparse-1b]   GPUS [8]   MASTER_PORT [29500]   DRY_RUN=1 prints the command
set -euo pipefail
cd "$(dirname "$0")/.."

DATA=${DATA:?set DATA to a preprocessed dataset prefix or a weighted blend}
TOKENIZER=${TOKENIZER:?set TOKENIZER to a SentencePiece tokenizer.model}
SAVE=${SAVE:-checkpoints/qsparse-1b}
GPUS=${GPUS:-8}
MASTER_PORT=${MASTER_PORT:-29500}

# 512 sequences x 2048 tokens = 1M tokens per step; 8 ranks x micro-batch 8 x 8 accumulation.
ARGS=(
  --num-layers 22 --hidden-size 2048 --num-attention-heads 32 --num-query-groups 4
  --ffn-hidden-size 5632 --seq-length 2048 --ffn-type relu2_glu
  --qsparse-mode topk --qsparse-ratio 0.4
  --zero-stage 1 --deepspeed-config examples/deepspeed/zero1_bf16.json --bf16
  --micro-batch-size 8 --global-batch-size 512 --train-iters 50000
  --lr 4e-4 --min-lr 4e-5 --lr-warmup-iters 2000 --lr-decay-style cosine
  --weight-decay 0.1 --clip-grad 1.0
  --data-path $DATA --split 998,1,1 --tokenizer-type SentencePieceTokenizer
  --tokenizer-model "$TOKENIZER"
  --save "$SAVE" --load "$SAVE" --save-interval 2000 --keep-last-n-checkpoints 3
  --eval-interval 2000 --eval-iters 10 --log-interval 10 --tensorboard-dir "$SAVE/tensorboard"
)
CMD=(deepspeed --num_gpus "$GPUS" --master_port "$MASTER_PORT" pretrain_qsparse.py "${ARGS[@]}" "$@")
if [ "${DRY_RUN:-0}" = 1 ]; then printf '%q ' "${CMD[@]}"; echo; exit 0; fi
exec "${CMD[@]}"
