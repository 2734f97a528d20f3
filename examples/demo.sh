#!/usr/bin/env bash
# The `make demo` recipe: preprocess the bundled corpus, train a tiny Q-Sparse model on CPU with
# TensorBoard logs, evaluate, print a summary. Extra arguments go to pretrain_qsparse.py.
# DEMO_CONFIG picks another YAML config, e.g. DEMO_CONFIG=examples/configs/demo_moe.yaml (MoE).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
OUT=${DEMO_DIR:-build/demo}
CORPUS=examples/data/kjv_sample.jsonl
TOKENIZER=examples/data/kjv_sp4k.model
CONFIG=${DEMO_CONFIG:-examples/configs/demo_tiny.yaml}
mkdir -p "$OUT"

if [ ! -f "$OUT/kjv_text_document.idx" ] || [ "$CORPUS" -nt "$OUT/kjv_text_document.idx" ]; then
  echo "==> preprocessing $CORPUS"
  "$PY" tools/preprocess_data.py --input "$CORPUS" --output-prefix "$OUT/kjv" \
    --tokenizer-type SentencePieceTokenizer --tokenizer-model "$TOKENIZER" \
    --append-eod --workers 2 --log-interval 400
fi

echo "==> training (TensorBoard logs in $OUT/tensorboard)"
"$PY" pretrain_qsparse.py --config "$CONFIG" \
  --data-path "$OUT/kjv_text_document" --data-cache-path "$OUT/cache" \
  --tensorboard-dir "$OUT/tensorboard" --summary-json "$OUT/summary.json" "$@"
echo "view the curves with: $PY -m tensorboard.main --logdir $OUT/tensorboard"
