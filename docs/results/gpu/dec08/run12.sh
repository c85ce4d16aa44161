#!/usr/bin/env bash
# Issue 22's HTTP goodput run and issue 25's shared-tier rows (run5.sh of 2026-12-07, never run: no
# device machine started), with 2026-12-08's connections per stream: the read alone and the served
# TTFT over 1, 2 and 4 connections, from a stock redis-server and from one with io-threads 4.
# Needs .whl and .tok carried. About 9 minutes.
set -u
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
  && export PYTHONPATH=/tmp/site:$PWD || exit 1
OUT=${OUT:-out/gpu}; mkdir -p "$OUT"; t0=$(date +%s)
nvidia-smi --query-gpu=name --format=csv,noheader
export RAGBLEND_CACHE=$PWD/.tok
timeout 250 python3 -m api.cli bench-http --model random:mistral-7b-smol --device cuda --goodput 128 --modes blend \
  --time-budget 220 --server-module tests.serve_for_tests --out /tmp/http -- --slot-tokens 3584 --max-ratio 0 > "$OUT/http.log" 2>&1
echo "http rc $? at $(( $(date +%s) - t0 )) s"; cp /tmp/http/*.json /tmp/http/*.md "$OUT/" 2>/dev/null; cat /tmp/http/*.md 2>/dev/null; tail -6 "$OUT/http.log"
for io in 1 4; do
  timeout 60 python3 -m api.bench_fleet stream --shape mistral-7b --runs 9 --warmup 2 --fetchers 1,2,4 --io-threads $io \
    --out "$OUT/stream-io$io.json" > "$OUT/stream-io$io.log" 2>&1
  echo "stream io-threads $io rc $? at $(( $(date +%s) - t0 )) s"; grep -E "^\||cores" "$OUT/stream-io$io.log"
done
timeout 100 python3 -m api.bench_fleet ttft --shape mistral-7b --device cuda --dtype bfloat16 --runs 8 --warmup 2 \
  --fetchers 1,4 --io-threads 4 --out "$OUT/ttft_redis.json" > "$OUT/fleet.log" 2>&1
echo "ttft rc $? at $(( $(date +%s) - t0 )) s"; grep -E "^\||cores" "$OUT/fleet.log"
timeout 100 python3 -m api.bench_fleet precompute --model random:mistral-7b --device cuda --dtype bfloat16 --chunk-tokens 512 \
  --chunks 32 --out "$OUT/precompute.json" > "$OUT/precompute.log" 2>&1; echo "precompute rc $? at $(( $(date +%s) - t0 )) s"; grep "^|" "$OUT/precompute.log"
