#!/usr/bin/env bash
# H200 (device tool, from the project root, with .whl carried): CUDA tests of the streamed,
# quantized and loading-controller paths, then `ragblend bench` per shape (every cell timed in
# turns; mistral-7b also profiled). Files land in $OUT.
set -u
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
  && export PYTHONPATH=/tmp/site:$PWD || exit 1
OUT=${OUT:-out/gpu}; mkdir -p "$OUT"
t0=$(date +%s)
python3 -m pytest -q -x -p no:cacheprovider ${TESTS:-tests/test_cuda.py tests/test_quant.py tests/test_loading.py} \
  > "$OUT/cuda-tests.log" 2>&1
echo "tests done at $(( $(date +%s) - t0 )) s"; tail -3 "$OUT/cuda-tests.log"
for shape in ${SHAPES:-mistral-7b}; do
  python3 -m api.cli bench --shape "$shape" --device cuda --sweep '' --tiers gpu,cpu,lmdb \
    --kv-dtype ${FORMATS:-int8,bfloat16} --ratios 0.15,0.3 --selections value,lookahead --runs 15 --warmup 3 \
    ${PROFILE:+--profile} --out "$OUT/bench-$shape" > "$OUT/bench-$shape.log" 2>&1
  echo "$shape done at $(( $(date +%s) - t0 )) s"; grep -v '^|---' "$OUT/bench-$shape/bench.md" 2>/dev/null || tail -20 "$OUT/bench-$shape.log"
done
