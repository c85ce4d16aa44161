#!/usr/bin/env bash
# Third GPU command of 2026-12-07: issue 22's HTTP comparison. The same goodput search (blend, 128
# output tokens) in process and through `ragblend serve` over HTTP, on the 7B shape that speaks
# the bundled tokenizer. Needs the tokenizer files (no weights) under .tok/models/ (carried).
set -u
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
  && export PYTHONPATH=/tmp/site:$PWD || exit 1
export RAGBLEND_CACHE=$PWD/.tok
OUT=${OUT:-out/gpu}; mkdir -p "$OUT"; t0=$(date +%s)
nvidia-smi --query-gpu=name --format=csv,noheader
timeout 200 python3 -m api.cli bench-serve --shape mistral-7b-smol --device cuda --rates '' --goodput 128 --modes blend \
  --step-batches '' --time-budget 170 --out /tmp/inproc > "$OUT/inproc.log" 2>&1
echo "in-process rc $? at $(( $(date +%s) - t0 )) s"; cp /tmp/inproc/serve.json "$OUT/inproc.json" 2>/dev/null
cp /tmp/inproc/serve.md "$OUT/inproc.md" 2>/dev/null; cat /tmp/inproc/serve.md; tail -8 "$OUT/inproc.log"
timeout 360 python3 -m api.cli bench-http --model random:mistral-7b-smol --device cuda --goodput 128 --modes blend \
  --time-budget 300 --server-module tests.serve_for_tests --out /tmp/http -- --slot-tokens 3584 --max-ratio 0 \
  > "$OUT/http.log" 2>&1
echo "http rc $? at $(( $(date +%s) - t0 )) s"; cp /tmp/http/*.json "$OUT/" 2>/dev/null; cp /tmp/http/*.md "$OUT/" 2>/dev/null
cat /tmp/http/*.md 2>/dev/null; tail -15 "$OUT/http.log"
