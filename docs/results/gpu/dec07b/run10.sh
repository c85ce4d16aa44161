#!/usr/bin/env bash
# One command for issue 20 (run8 and run9 folded together: device time is short, and machine
# starts fail often). mistral-7b on every tier with every selection's cost (issue 21, Show 4) and a profile; the tree
# before (commit cd04894, .old/tree) on the streamed int8 cells alone; llama-3.1-8b and
# qwen2.5-7b on every tier; then the CUDA tests of the stream, the probe, the decode and the scheduler.
set -u
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
  && export PYTHONPATH=/tmp/site:$PWD || exit 1
OUT=${OUT:-out/gpu}; mkdir -p "$OUT"; t0=$(date +%s)
nvidia-smi --query-gpu=name --format=csv,noheader
bench() {  # name, timeout, then bench flags
  local name=$1 limit=$2; shift 2
  timeout "$limit" python3 -m api.cli bench --device cuda --sweep '' --ratios 0.15 --runs 10 --warmup 3 "$@" \
    --out /tmp/bench-$name > "$OUT/bench-$name.log" 2>&1
  echo "$name rc $? at $(( $(date +%s) - t0 )) s"; grep -v "^|---" /tmp/bench-$name/bench.md
  cp /tmp/bench-$name/bench.md "$OUT/bench-$name.md" 2>/dev/null; cp /tmp/bench-$name/bench.json "$OUT/bench-$name.json" 2>/dev/null
}
bench mistral-7b 160 --shape mistral-7b --tiers gpu,cpu,lmdb --kv-dtype int8,bfloat16 --profile \
  --selections value,lookahead,question,question-value,key,attention,first,hybrid
grep "^profile" "$OUT/bench-mistral-7b.log"; (cd /tmp/bench-mistral-7b && tar czf "$OUT/profile.tgz" profile)
(cd .old/tree && PYTHONPATH=/tmp/site:$PWD timeout 90 python3 -m api.cli bench --device cuda --sweep '' --ratios 0.15 \
  --runs 10 --warmup 3 --shape mistral-7b --tiers gpu,lmdb --kv-dtype int8 --out /tmp/bench-old > "$OUT/bench-old.log" 2>&1)
echo "old rc $? at $(( $(date +%s) - t0 )) s"; grep -v "^|---" /tmp/bench-old/bench.md; cp /tmp/bench-old/bench.md "$OUT/bench-old.md" 2>/dev/null
bench llama-3.1-8b 120 --shape llama-3.1-8b --tiers gpu,cpu,lmdb --kv-dtype int8,bfloat16
bench qwen2.5-7b 120 --shape qwen2.5-7b --tiers gpu,cpu,lmdb --kv-dtype int8,bfloat16
timeout 80 python3 -m pytest -q -p no:cacheprovider tests/test_quant.py tests/test_loading.py tests/test_cuda.py \
  tests/test_scheduler.py tests/test_tiers.py -k "streamed or streams or lookahead or kernel or several or rows or graph_path or every_selection or freed_once or spread" \
  > "$OUT/cuda-tests.log" 2>&1
echo "tests rc $? at $(( $(date +%s) - t0 )) s"; tail -3 "$OUT/cuda-tests.log"
