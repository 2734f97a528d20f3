#!/usr/bin/env bash
# The prepared GPU check: one command, at most ~8 minutes on one H100/H200-class GPU.
#   1. the CUDA tests of the suite (Triton sparsifiers and decode GEMV against the references,
#      no host synchronisation, compiled blocks under set_sync_debug_mode("error"), 2:4 GEMM);
#   2. bench/gpu_check.py: sparsifier vs matmul at 7B shapes, dense vs Q-Sparse training step
#      (tokens/s, MFU) on the 1B shape with compiled blocks, decode GEMV speed-up / ideal, 2:4.
# It needs torch with CUDA, triton, pytest, sentencepiece (no deepspeed: nothing here uses it).
# On a machine without CUDA, `bash bench/gpu_check.sh --smoke` checks the script at tiny shapes.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-python3}
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
# the CPU kernels are not needed on the GPU machine: skip their build
export MEGATRON_QSPARSE_KERNELS=${MEGATRON_QSPARSE_KERNELS:-0}
SMOKE=""
[ "${1:-}" = "--smoke" ] && SMOKE="--smoke"
"$PY" -c "import torch; print('GPU:', torch.cuda.get_device_name() if torch.cuda.is_available() else 'none')"
echo "== CUDA tests"
TESTS=(tests/unit/test_triton_kernels.py tests/unit/test_compile.py tests/unit/test_packing.py)
if [ -z "$SMOKE" ]; then
  TESTS+=(tests/unit/test_decode_kernels.py)
  timeout 240 "$PY" -m pytest -q -p no:cacheprovider -o addopts="" "${TESTS[@]}" -k "cuda or triton or semi or sync" 2>&1 | tail -20
else  # the CPU interpreter: a few of the Triton tests only
  timeout 240 "$PY" -m pytest -q -p no:cacheprovider -o addopts="" tests/unit/test_triton_kernels.py -k "candidates" 2>&1 | tail -3
fi
echo "== benchmarks"
timeout 330 "$PY" bench/gpu_check.py $SMOKE
