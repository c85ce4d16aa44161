#!/usr/bin/env bash
# First GPU command of 2026-12-07: the CUDA cases of the last round's changes (streamed int8/fp8/
# bf16 KV, device-tier promotion, batched lookahead probe, shared tier from Redis); the cost of
# lookahead vs value with the batched probe, with a profile of reuse and blend per tier; issue 25's
# per-GPU precompute rate and Redis-vs-LMDB TTFT.
set -u
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
  && export PYTHONPATH=/tmp/site:$PWD || exit 1
OUT=${OUT:-out/gpu}; mkdir -p "$OUT"; t0=$(date +%s)
nvidia-smi --query-gpu=name --format=csv,noheader
python3 -c "from blend import hostwait; print('hostwait available:', hostwait.available())"
timeout 110 python3 -m pytest -q -p no:cacheprovider tests/test_quant.py tests/test_loading.py tests/test_cuda.py \
  -k "streamed or lookahead or shared_tier" > "$OUT/cuda-tests.log" 2>&1
echo "tests rc $? at $(( $(date +%s) - t0 )) s"; grep -E "passed|failed|FAILED|Error" "$OUT/cuda-tests.log" | tail -12
timeout 200 python3 -m api.cli bench --shape mistral-7b --device cuda --sweep '' --tiers gpu,lmdb --kv-dtype int8 --ratios 0.15 \
  --selections value,lookahead --runs 10 --warmup 3 --profile --out /tmp/bench > "$OUT/bench.log" 2>&1
echo "bench rc $? at $(( $(date +%s) - t0 )) s"; grep -v "^|---" /tmp/bench/bench.md; grep "^profile" "$OUT/bench.log"
cp /tmp/bench/bench.md /tmp/bench/bench.json "$OUT/" 2>/dev/null; (cd /tmp/bench && tar czf "$OUT/profile.tgz" profile)
timeout 90 python3 -m api.bench_fleet precompute --model random:mistral-7b --device cuda --dtype bfloat16 --chunk-tokens 512 \
  --chunks 32 --out "$OUT/precompute.json" > "$OUT/fleet.log" 2>&1; echo "precompute rc $? at $(( $(date +%s) - t0 )) s"
timeout 120 python3 -m api.bench_fleet ttft --shape mistral-7b --device cuda --dtype bfloat16 --runs 15 --warmup 3 \
  --out "$OUT/ttft_redis.json" >> "$OUT/fleet.log" 2>&1; echo "ttft rc $? at $(( $(date +%s) - t0 )) s"; tail -20 "$OUT/fleet.log"
