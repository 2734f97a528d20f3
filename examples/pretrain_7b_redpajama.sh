#!/usr/bin/env bash
# Q-Sparse 7B (LLaMA-7B shape) from scratch on RedPajama: 4 nodes x 8 GPUs,
# TP = 2 x PP = 2 x DP = 8, ZeRO-1, bf16 — the paper's from-scratch setting (LLaMA tokenizer,
# top-K S = 0.4 on every projection, squared-ReLU GLU FFN, 50B tokens).
#
# Every setting is an environment variable with a default; nothing is positional.
#   DATA       weighted blend of preprocessed RedPajama subsets (tools/preprocess_data.py output),
#              e.g. "0.67 /data/rp/common_crawl_text_document 0.15 /data/rp/c4_text_document ..."
#   TOKENIZER  LLaMA's SentencePiece tokenizer.model
#   SAVE       checkpoint directory (resumed from automatically when it holds a checkpoint)
#   HOSTFILE   DeepSpeed hostfile ("node-a slots=8" per line), ssh-reachable nodes
# Under a scheduler without ssh, start this script once per node with NO_SSH=1, NODE_RANK and
# MASTER_ADDR set (see examples/slurm/pretrain_7b.sbatch). DRY_RUN=1 prints the command only.
set -euo pipefail
cd "$(dirname "$0")/.."

DATA=${DATA:?set DATA to the weighted RedPajama blend (see the header)}
TOKENIZER=${TOKENIZER:?set TOKENIZER to LLaMA tokenizer.model}
SAVE=${SAVE:-checkpoints/qsparse-7b}
TB=${TB:-$SAVE/tensorboard}
HOSTFILE=${HOSTFILE:-hostfile}
MASTER_ADDR=${MASTER_ADDR:-}
MASTER_PORT=${MASTER_PORT:-29500}
PY=${PY:-python}

# 1024 sequences x 2048 tokens = 2M tokens per step; 50B tokens = 23,842 steps.
# DP = 32 GPUs / (TP 2 x PP 2) = 8; micro-batch 1 -> 128 micro-batches per step in the pipeline
# (1F1B bubble (p-1)/(m+p-1) = 0.8%).
ARGS=(
  --num-layers 32 --hidden-size 4096 --num-attention-heads 32 --ffn-hidden-size 11008
  --seq-length 2048 --ffn-type relu2_glu --normalization RMSNorm --norm-epsilon 1e-5
  --untie-embeddings-and-output-weights
  --qsparse-mode topk --qsparse-ratio 0.4
  --tensor-model-parallel-size 2 --pipeline-model-parallel-size 2 --zero-stage 1
  --deepspeed-config examples/deepspeed/zero1_bf16.json --bf16
  --recompute-activations
  --micro-batch-size 1 --global-batch-size 1024 --train-iters 23842
  --lr 3e-4 --min-lr 3e-5 --lr-warmup-iters 2000 --lr-decay-style cosine
  --weight-decay 0.1 --adam-beta1 0.9 --adam-beta2 0.95 --clip-grad 1.0
  --data-path $DATA --split 998,1,1 --tokenizer-type Llama2Tokenizer --tokenizer-model "$TOKENIZER"
  --save "$SAVE" --load "$SAVE" --save-interval 1000 --keep-last-n-checkpoints 3
  --eval-interval 1000 --eval-iters 10 --log-interval 10 --tensorboard-dir "$TB"
)

if [ "${NO_SSH:-0}" = 1 ]; then
  LAUNCH=(deepspeed --hostfile "$HOSTFILE" --no_ssh --node_rank "${NODE_RANK:?set NODE_RANK}"
          --master_addr "${MASTER_ADDR:?set MASTER_ADDR}" --master_port "$MASTER_PORT")
else
  LAUNCH=(deepspeed --hostfile "$HOSTFILE" --master_port "$MASTER_PORT"
          ${MASTER_ADDR:+--master_addr "$MASTER_ADDR"})
fi
CMD=("${LAUNCH[@]}" pretrain_qsparse.py "${ARGS[@]}" "$@")
if [ "${DRY_RUN:-0}" = 1 ]; then printf '%q ' "${CMD[@]}"; echo; exit 0; fi
exec "${CMD[@]}"
