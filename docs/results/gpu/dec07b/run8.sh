#!/usr/bin/env bash
# First GPU command of the 2026-12-07 third session. Issue 20: the reader's crew (copy, flag and
# verify per layer on one task), the kept packed index / Triton tables / rotation tables and the
# one-copy lookahead probe, against the tree before (commit cd04894, in .old/tree), two processes
# back to back; the new one profiled. The CUDA tests of the stream, the probe and the decode.
set -u
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
  && export PYTHONPATH=/tmp/site:$PWD || exit 1
OUT=${OUT:-out/gpu}; mkdir -p "$OUT"; t0=$(date +%s)
nvidia-smi --query-gpu=name --format=csv,noheader
B=(--shape mistral-7b --device cuda --sweep '' --tiers gpu,lmdb --kv-dtype int8,bfloat16 --ratios 0.15 --runs 10 --warmup 3)
(cd .old/tree && PYTHONPATH=/tmp/site:$PWD timeout 110 python3 -m api.cli bench "${B[@]}" --out /tmp/bench-old > "$OUT/bench-old.log" 2>&1)
echo "old bench rc $? at $(( $(date +%s) - t0 )) s"; grep -v "^|---" /tmp/bench-old/bench.md
timeout 150 python3 -m api.cli bench "${B[@]}" --selections value,lookahead --profile --out /tmp/bench-new > "$OUT/bench-new.log" 2>&1
echo "new bench rc $? at $(( $(date +%s) - t0 )) s"; grep -v "^|---" /tmp/bench-new/bench.md; grep "^profile" "$OUT/bench-new.log"
cp /tmp/bench-old/bench.md "$OUT/bench-old.md"; cp /tmp/bench-new/bench.md "$OUT/bench-new.md"; cp /tmp/bench-new/bench.json "$OUT/bench-new.json"
(cd /tmp/bench-new && tar czf "$OUT/profile.tgz" profile)
timeout 120 python3 -m pytest -q -p no:cacheprovider tests/test_quant.py tests/test_loading.py tests/test_cuda.py \
  -k "streamed or streams or lookahead or kernel or several or rows or graph_path or every_selection" > "$OUT/cuda-tests.log" 2>&1
echo "tests rc $? at $(( $(date +%s) - t0 )) s"; tail -3 "$OUT/cuda-tests.log"
