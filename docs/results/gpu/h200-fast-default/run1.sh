#!/usr/bin/env bash
# One H200 command (device tool, from the project root, with .whl carried): the CUDA tests, then
# `ragblend bench` on the three 7B-class shapes, every cell timed in turns. Files land in $OUT.
set -u
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
  && export PYTHONPATH=/tmp/site:$PWD || exit 1
OUT=${OUT:-out/gpu}; mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv > "$OUT/gpu.txt"
t0=$(date +%s)
python3 -m pytest -q -x -p no:cacheprovider tests/test_cuda.py tests/test_quant.py > "$OUT/cuda-tests.log" 2>&1
echo "tests done at $(( $(date +%s) - t0 )) s"; tail -3 "$OUT/cuda-tests.log"
for shape in ${SHAPES:-mistral-7b llama-3.1-8b qwen2.5-7b}; do
  python3 -m api.cli bench --shape "$shape" --device cuda --sweep '' --tiers gpu,cpu,lmdb \
    --kv-dtype int8,bfloat16,fp8 --ratios 0.15,0.3 --selections value,lookahead --runs 15 --warmup 3 \
    --out "$OUT/bench-$shape" > "$OUT/bench-$shape.log" 2>&1
  echo "$shape done at $(( $(date +%s) - t0 )) s"; cat "$OUT/bench-$shape/bench.md" 2>/dev/null || tail -20 "$OUT/bench-$shape.log"
done
