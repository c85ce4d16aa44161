#!/usr/bin/env bash
# Issue 20's Show 2 after run8's changes: the three shapes on every tier, int8 and bf16 stores,
# timed in turns (one command per shape); mistral-7b also with value and lookahead on the GPU tier
# (the default selection's cost). Then the CUDA tests of the stream, the probe and the scheduler.
set -u
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
  && export PYTHONPATH=/tmp/site:$PWD || exit 1
OUT=${OUT:-out/gpu}; mkdir -p "$OUT"; t0=$(date +%s)
nvidia-smi --query-gpu=name --format=csv,noheader
for shape in mistral-7b llama-3.1-8b qwen2.5-7b; do
  extra=(); [ "$shape" = mistral-7b ] && extra=(--selections value,lookahead)
  timeout 150 python3 -m api.cli bench --shape $shape --device cuda --sweep '' --tiers gpu,cpu,lmdb --ratios 0.15 \
    --runs 10 --warmup 3 --kv-dtype int8,bfloat16 "${extra[@]}" --out /tmp/bench-$shape > "$OUT/bench-$shape.log" 2>&1
  echo "$shape rc $? at $(( $(date +%s) - t0 )) s"; grep -v "^|---" /tmp/bench-$shape/bench.md
  cp /tmp/bench-$shape/bench.md "$OUT/bench-$shape.md"; cp /tmp/bench-$shape/bench.json "$OUT/bench-$shape.json"
done
timeout 110 python3 -m pytest -q -p no:cacheprovider tests/test_cuda.py tests/test_scheduler.py tests/test_redis_stream.py \
  tests/test_tiers.py -k "streamed or streams or shared_tier or freed_once or spread or graph_path" > "$OUT/cuda-tests.log" 2>&1
echo "tests rc $? at $(( $(date +%s) - t0 )) s"; tail -3 "$OUT/cuda-tests.log"
