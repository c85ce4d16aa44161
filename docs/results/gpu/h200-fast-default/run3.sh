#!/usr/bin/env bash
# The session's last H200 command (device tool, project root, .whl carried): `ragblend bench` on the
# three shapes (every cell timed in turns; the headline row is the default served configuration;
# mistral also times the selections and gradual filtering), then the CUDA tests as time allows.
set -u
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
  && export PYTHONPATH=/tmp/site:$PWD || exit 1
OUT=${OUT:-out/gpu}; mkdir -p "$OUT"
t0=$(date +%s)
common="--device cuda --sweep '' --tiers gpu,cpu,lmdb --kv-dtype int8,bfloat16 --ratios 0.15,0.3 --runs 12 --warmup 3"
for shape in mistral-7b llama-3.1-8b qwen2.5-7b; do
  extra=""
  [ "$shape" = mistral-7b ] && extra="--selections value,lookahead,question-value --gradual 1,8"
  eval python3 -m api.cli bench --shape "$shape" $common $extra --out "$OUT/bench-$shape" > "$OUT/bench-$shape.log" 2>&1
  echo "$shape done at $(( $(date +%s) - t0 )) s"; grep -v '^|---' "$OUT/bench-$shape/bench.md" 2>/dev/null || tail -20 "$OUT/bench-$shape.log"
done
left=$(( ${BUDGET:-540} - ($(date +%s) - t0) - 10 ))
echo "tests get ${left} s"
timeout "$left" python3 -m pytest -q -p no:cacheprovider tests/test_cuda.py tests/test_quant.py tests/test_loading.py \
  tests/test_tiers.py > "$OUT/cuda-tests.log" 2>&1
echo "tests rc $? at $(( $(date +%s) - t0 )) s"; tail -15 "$OUT/cuda-tests.log"
