#!/usr/bin/env bash
# Supervised fine-tuning of Mistral-7B into a Q-Sparse model on OpenOrca — the paper's settings:
#   * batch 128 samples, one epoch, lr chosen from {3e-6, 5e-6, 7e-6} (LR below), AdamW;
#   * top-K on every projection input (after the SwiGLU activation in the FFN), no architecture
#     change, with a short sparsity warm-up;
#   * the loss covers the response tokens only (tools/preprocess_sft.py writes the mask).
# The authors' own later release also used seq 4096, bf16 and a cosine schedule (as below).
#
# Steps: import the Hugging Face checkpoint (once), tokenize OpenOrca with the prompt template
# (once), fine-tune for one epoch, export to HF. Settings come from environment variables
# (defaults below); extra flags go to pretrain_qsparse.py. OpenOrca is a jsonl with
# system_prompt/question/response per line; generic input/output records work too.
set -euo pipefail
cd "$(dirname "$0")/.."

PY=${PY:-python}
HF_DIR=${HF_DIR:-checkpoints/hf/Mistral-7B-v0.1}
TOKENIZER=${TOKENIZER:-$HF_DIR/tokenizer.model}
TOKENIZER_TYPE=${TOKENIZER_TYPE:-SentencePieceTokenizer}
SFT_JSONL=${SFT_JSONL:-data/openorca/openorca.jsonl}
TEMPLATE=${TEMPLATE:-alpaca}                             # or chatml
DATA=${DATA:-data/openorca_mistral}
CKPT=${CKPT:-checkpoints/mistral7b-qsparse-openorca}
NUM_GPUS=${NUM_GPUS:-8}
TP=${TP:-1}
SEQ=${SEQ:-4096}
MICRO_BATCH=${MICRO_BATCH:-4}
GLOBAL_BATCH=${GLOBAL_BATCH:-128}
LR_WARMUP=${LR_WARMUP:-20}
LR=${LR:-5e-6}                                           # the paper: best of 3e-6, 5e-6, 7e-6
SPARSITY=${SPARSITY:-0.4}
SPARSITY_WARMUP=${SPARSITY_WARMUP:-50}
EPOCHS=${EPOCHS:-1}
PACKING=${PACKING:-0}                                    # 1: --sft-packing (several samples per sequence)

if [ ! -f "$CKPT/init/latest" ]; then
  echo "==> importing $HF_DIR (TP=$TP)"
  "$PY" tools/checkpoint_convert.py import-hf --hf-dir "$HF_DIR" --save "$CKPT/init" \
    --target-tensor-parallel-size "$TP" --tokenizer-model "$TOKENIZER" --seq-length "$SEQ"
fi

if [ ! -f "${DATA}_sft.json" ]; then
  echo "==> tokenizing $SFT_JSONL"
  "$PY" tools/preprocess_sft.py --input "$SFT_JSONL" --output-prefix "$DATA" \
    --template "$TEMPLATE" --tokenizer-type "$TOKENIZER_TYPE" --tokenizer-model "$TOKENIZER"
fi
# one epoch = ceil(sequences / global batch) steps (the split keeps 0.5% for validation); a
# sequence is one sample, or with PACKING=1 the first-fit packing of them (about the same count
# for any epoch's order)
PACK_FLAGS=()
if [ "$PACKING" = 1 ]; then PACK_FLAGS=(--sft-packing); fi
TRAIN_ITERS=${TRAIN_ITERS:-$("$PY" -c "
import math
import numpy as np
from megatron_qsparse.data.indexed_dataset import IndexedDataset
from megatron_qsparse.data.sft_packing import pack_epoch
lengths = IndexedDataset('${DATA}_sft').sequence_lengths
lengths = lengths[:int(len(lengths) * 0.995)]
n = len(lengths)
if $PACKING == 1:
    n = len(pack_epoch(np.random.default_rng(0).permutation(lengths), $SEQ + 1)[1]) - 1
print(max(1, math.ceil($EPOCHS * n / $GLOBAL_BATCH)))")}
echo "==> fine-tuning for $TRAIN_ITERS steps"

deepspeed --num_gpus "$NUM_GPUS" pretrain_qsparse.py --config "$CKPT/init/model_args.yaml" \
  --load "$CKPT/init" --finetune --save "$CKPT/sft" --save-interval 1000 \
  --tensor-model-parallel-size "$TP" --zero-stage 2 --bf16 \
  --data-format sft ${PACK_FLAGS[@]+"${PACK_FLAGS[@]}"} --data-path "${DATA}_sft" --split 995,5,0 \
  --tokenizer-type "$TOKENIZER_TYPE" --tokenizer-model "$TOKENIZER" \
  --seq-length "$SEQ" --micro-batch-size "$MICRO_BATCH" --global-batch-size "$GLOBAL_BATCH" \
  --train-iters "$TRAIN_ITERS" --lr "$LR" --min-lr 0 --lr-warmup-iters "$LR_WARMUP" \
  --lr-decay-style cosine --weight-decay 0.0 --clip-grad 1.0 \
  --qsparse-mode topk --qsparse-ratio "$SPARSITY" --qsparse-warmup-iters "$SPARSITY_WARMUP" \
  --eval-interval 200 --eval-iters 10 --log-interval 10 --tensorboard-dir "$CKPT/tensorboard" \
  "$@"

echo "==> exporting to $CKPT/hf"
rm -rf "$CKPT/hf"
"$PY" tools/checkpoint_convert.py export-hf --load "$CKPT/sft" --save "$CKPT/hf" --dtype bfloat16
