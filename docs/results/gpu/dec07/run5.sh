#!/usr/bin/env bash
# Issue 22's HTTP goodput run (then issue 25's shared-tier read and TTFT), left from 2026-12-07 (run3 lacked the fastapi-offline wheel; then the
# device time ran out). Needs .whl (with fastapi-offline) and .tok (the bundled tokenizer's files) carried;
# compare with run3's in-process figure on the same card.
set -u
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
  && export PYTHONPATH=/tmp/site:$PWD || exit 1
OUT=${OUT:-out/gpu}; mkdir -p "$OUT"; t0=$(date +%s)
export RAGBLEND_CACHE=$PWD/.tok
timeout 330 python3 -m api.cli bench-http --model random:mistral-7b-smol --device cuda --goodput 128 --modes blend \
  --time-budget 300 --server-module tests.serve_for_tests --out /tmp/http -- --slot-tokens 3584 --max-ratio 0 > "$OUT/http.log" 2>&1
echo "http rc $? at $(( $(date +%s) - t0 )) s"; cp /tmp/http/*.json /tmp/http/*.md "$OUT/" 2>/dev/null; cat /tmp/http/*.md 2>/dev/null; tail -6 "$OUT/http.log"
# issue 25: the shared tier's read with kept buffers (2026-12-07, second session), then the TTFT cells of run4
timeout 60 python3 -m api.bench_fleet stream --shape mistral-7b --runs 15 --warmup 3 --out "$OUT/stream.json" > "$OUT/stream.log" 2>&1
echo "stream rc $? at $(( $(date +%s) - t0 )) s"; grep "^|" "$OUT/stream.log"
timeout 90 python3 -m api.bench_fleet ttft --shape mistral-7b --device cuda --dtype bfloat16 --runs 8 --warmup 2 \
  --out "$OUT/ttft_redis.json" > "$OUT/fleet.log" 2>&1; echo "ttft rc $? at $(( $(date +%s) - t0 )) s"; grep "^|" "$OUT/fleet.log"
# issue 25: chunk-KV precompute with the single-copy encode (run1 gave 5,388 tokens/s with the int8 encode)
timeout 120 python3 -m api.bench_fleet precompute --model random:mistral-7b --device cuda --dtype bfloat16 --chunk-tokens 512 \
  --chunks 32 --out "$OUT/precompute.json" > "$OUT/precompute.log" 2>&1; echo "precompute rc $? at $(( $(date +%s) - t0 )) s"; grep "^|" "$OUT/precompute.log"
