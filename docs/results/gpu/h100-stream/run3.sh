#!/usr/bin/env bash
# Third GPU command of 2026-12-06: the CUDA cases run2 failed, after the fix; the selections' cost
# with the batched lookahead probe; a profile of blend streamed from int8 LMDB.
set -u
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
  && export PYTHONPATH=/tmp/site:$PWD || exit 1
OUT=${OUT:-out/gpu}; mkdir -p "$OUT"; t0=$(date +%s)
nvidia-smi --query-gpu=name --format=csv,noheader
# the CUDA cases run2 failed (a wait() after close() in the device-tier promotion), after the fix
timeout 100 python3 -m pytest -q -p no:cacheprovider tests/test_quant.py tests/test_loading.py tests/test_cuda.py -k "streamed or lookahead or shared_tier" > "$OUT/cuda-tests.log" 2>&1
echo "tests rc $? at $(( $(date +%s) - t0 )) s"; tail -3 "$OUT/cuda-tests.log"
# where blend's time goes when its KV streams from int8 LMDB, with the new reads
python3 -m api.cli bench --shape mistral-7b --device cuda --sweep '' --tiers gpu,lmdb --kv-dtype int8 --ratios 0.15 \
  --selections value,lookahead --runs 8 --warmup 2 --out /tmp/bench > "$OUT/bench.log" 2>&1; echo "bench rc $? at $(( $(date +%s) - t0 )) s"
grep -v "^|---" /tmp/bench/bench.md; cp /tmp/bench/bench.md "$OUT/"
# issue 25: chunk-KV precompute tokens/s per GPU, and TTFT with KV from a Redis on loopback vs LMDB
timeout 90 python3 -m api.bench_fleet precompute --model random:mistral-7b --device cuda --dtype bfloat16 --chunk-tokens 512 \
  --chunks 32 --out "$OUT/precompute.json" > "$OUT/fleet.log" 2>&1; echo "precompute rc $? at $(( $(date +%s) - t0 )) s"
timeout 120 python3 -m api.bench_fleet ttft --shape mistral-7b --device cuda --dtype bfloat16 --runs 15 --warmup 3 \
  --out "$OUT/ttft_redis.json" >> "$OUT/fleet.log" 2>&1; echo "ttft rc $? at $(( $(date +%s) - t0 )) s"; tail -20 "$OUT/fleet.log"
# (the goodput search of issue 22 needs ~10 min of device time: the next session's)
