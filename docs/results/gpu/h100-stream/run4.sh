#!/usr/bin/env bash
# Last GPU command of 2026-12-06 (little device time left): the CUDA cases that cover this round's
# changes — streamed int8/fp8/bf16 KV (copy first, verify after), the device-tier promotion that
# run2 failed, the batched lookahead probe, the shared tier streamed from Redis.
set -u
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
  && export PYTHONPATH=/tmp/site:$PWD || exit 1
OUT=${OUT:-out/gpu}; mkdir -p "$OUT"; nvidia-smi --query-gpu=name --format=csv,noheader
timeout 110 python3 -m pytest -q -p no:cacheprovider -x tests/test_quant.py tests/test_loading.py tests/test_cuda.py \
  -k "streamed or lookahead or shared_tier" > "$OUT/cuda-tests.log" 2>&1
echo "tests rc $?"; grep -E "passed|failed|FAILED" "$OUT/cuda-tests.log" | tail -12
