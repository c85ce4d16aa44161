#!/usr/bin/env bash
# Second GPU command of 2026-12-07: issue 22's goodput search on the mistral-7b shape, blend and
# full, 32 and 128 output tokens, with the decode step table.
set -u
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
  && export PYTHONPATH=/tmp/site:$PWD || exit 1
OUT=${OUT:-out/gpu}; mkdir -p "$OUT"; t0=$(date +%s)
nvidia-smi --query-gpu=name --format=csv,noheader
python3 -m api.cli bench-serve --shape mistral-7b --device cuda --rates '' --goodput 32,128 --modes blend,full \
  --goodput-requests 200 --goodput-runs 4 --step-batches 1,32 --step-contexts 4096 --time-budget 420 --out /tmp/serve \
  > "$OUT/serve.log" 2>&1
echo "serve rc $? at $(( $(date +%s) - t0 )) s"; cp /tmp/serve/serve.* "$OUT/" 2>/dev/null; cat /tmp/serve/serve.md; tail -30 "$OUT/serve.log"
