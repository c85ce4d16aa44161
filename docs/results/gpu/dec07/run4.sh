#!/usr/bin/env bash
# Fourth GPU command of 2026-12-07. Issue 20: the stream's copies on one thread each (numpy)
# against the torch.cat copies of before (the tree with .old/reader.py), both benched in this
# command; the CUDA stream tests. Issue 25: Redis vs LMDB TTFT with hiredis.
set -u
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
  && export PYTHONPATH=/tmp/site:$PWD || exit 1
OUT=${OUT:-out/gpu}; mkdir -p "$OUT"; t0=$(date +%s)
nvidia-smi --query-gpu=name --format=csv,noheader
B=(--shape mistral-7b --device cuda --sweep '' --tiers gpu,lmdb --ratios 0.15 --runs 10 --warmup 3)
rm -rf /tmp/old && mkdir /tmp/old && cp -r api blend store retrieval eval tests pyproject.toml /tmp/old/ && cp .old/reader.py /tmp/old/store/reader.py
(cd /tmp/old && PYTHONPATH=/tmp/site:/tmp/old timeout 100 python3 -m api.cli bench "${B[@]}" --kv-dtype int8 --out /tmp/bench-old > "$OUT/bench-old.log" 2>&1)
echo "old bench rc $? at $(( $(date +%s) - t0 )) s"; grep -v "^|---" /tmp/bench-old/bench.md
timeout 130 python3 -m api.cli bench "${B[@]}" --kv-dtype int8,bfloat16 --profile --out /tmp/bench-new > "$OUT/bench-new.log" 2>&1
echo "new bench rc $? at $(( $(date +%s) - t0 )) s"; grep -v "^|---" /tmp/bench-new/bench.md; grep "^profile" "$OUT/bench-new.log"
cp /tmp/bench-old/bench.md "$OUT/bench-old.md"; cp /tmp/bench-new/bench.md "$OUT/bench-new.md"; cp /tmp/bench-new/bench.json "$OUT/bench-new.json"
(cd /tmp/bench-new && tar czf "$OUT/profile.tgz" profile)
timeout 50 python3 -m pytest -q -p no:cacheprovider tests/test_quant.py tests/test_loading.py -k streamed > "$OUT/cuda-tests.log" 2>&1
echo "tests rc $? at $(( $(date +%s) - t0 )) s"; tail -2 "$OUT/cuda-tests.log"
timeout 70 python3 -m api.bench_fleet ttft --shape mistral-7b --device cuda --dtype bfloat16 --runs 8 --warmup 2 \
  --out "$OUT/ttft_redis.json" > "$OUT/fleet.log" 2>&1; echo "ttft (hiredis) rc $? at $(( $(date +%s) - t0 )) s"; grep "^|" "$OUT/fleet.log"
