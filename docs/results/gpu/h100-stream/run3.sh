#!/usr/bin/env bash
# Third GPU command of 2026-12-06: goodput of the serving loop (issue 22), in process, for blend
# (the default served configuration) and full, at 32 and 128 output tokens.
set -u
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
  && export PYTHONPATH=/tmp/site:$PWD || exit 1
OUT=${OUT:-out/gpu}; mkdir -p "$OUT"; t0=$(date +%s)
nvidia-smi --query-gpu=name --format=csv,noheader
# the CUDA cases run2 failed (a wait() after close() in the device-tier promotion), after the fix
timeout 100 python3 -m pytest -q -p no:cacheprovider tests/test_quant.py tests/test_loading.py -k "streamed" > "$OUT/cuda-tests.log" 2>&1
echo "tests rc $? at $(( $(date +%s) - t0 )) s"; tail -3 "$OUT/cuda-tests.log"
# where blend's time goes when its KV streams from int8 LMDB, with the new reads
python3 -m api.cli bench --shape mistral-7b --device cuda --sweep '' --tiers gpu,lmdb --kv-dtype int8 --ratios 0.15 \
  --runs 6 --warmup 2 --profile --out /tmp/bench > "$OUT/bench.log" 2>&1; echo "bench rc $? at $(( $(date +%s) - t0 )) s"
grep profile "$OUT/bench.log"; (cd /tmp && tar czf "$OUT/profiles.tgz" bench/profile/*lmdb*trace.json bench/bench.md)
python3 -m api.cli bench-serve --shape mistral-7b --device cuda --rates '' --goodput 32,128 --modes blend,full \
  --goodput-requests 200 --goodput-runs 4 --step-batches 1,32,128 --step-contexts 4096 --time-budget ${BUDGET:-400} \
  --out /tmp/serve > "$OUT/serve.log" 2>&1
echo "serve rc $? at $(( $(date +%s) - t0 )) s"; tail -40 "$OUT/serve.log"
(cd /tmp && tar czf "$OUT/serve.tgz" serve)
