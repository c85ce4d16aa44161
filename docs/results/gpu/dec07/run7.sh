#!/usr/bin/env bash
# Issue 22's goodput again, after the fix for the spread full prefill that kept its cache alive
# (run2's full rows ran out of memory: 396 MiB asked, requests 174-199). Same command as run2.
set -u
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
  && export PYTHONPATH=/tmp/site:$PWD || exit 1
OUT=${OUT:-out/gpu}; mkdir -p "$OUT"; t0=$(date +%s)
nvidia-smi --query-gpu=name --format=csv,noheader
python3 -m api.cli bench-serve --shape mistral-7b --device cuda --rates '' --goodput 32,128 --modes blend,full \
  --goodput-requests 200 --goodput-runs 4 --step-batches 1,32 --step-contexts 4096 --time-budget 420 --out /tmp/serve \
  > "$OUT/serve.log" 2>&1
echo "serve rc $? at $(( $(date +%s) - t0 )) s"; cp /tmp/serve/serve.* "$OUT/" 2>/dev/null; cat /tmp/serve/serve.md
grep -c "failed" "$OUT/serve.log"; tail -30 "$OUT/serve.log"
