#!/usr/bin/env bash
# Second GPU command of 2026-12-06: the CUDA tests, then `ragblend bench` on the three shapes with
# copy-first streaming (one copy per layer, checksums after, reads begun at fetch), and the
# pre-change tree (.baseline/old.tgz, commit 98fb8f0) timed on the same machine for mistral.
set -u
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
  && export PYTHONPATH=/tmp/site:$PWD || exit 1
OUT=${OUT:-out/gpu}; mkdir -p "$OUT"; t0=$(date +%s)
nvidia-smi --query-gpu=name --format=csv,noheader
timeout 150 python3 -m pytest -q -p no:cacheprovider tests/test_cuda.py tests/test_quant.py tests/test_loading.py \
  tests/test_tiers.py tests/test_store.py > "$OUT/cuda-tests.log" 2>&1
echo "tests rc $? at $(( $(date +%s) - t0 )) s"; tail -4 "$OUT/cuda-tests.log"
mkdir -p /tmp/old && tar xzf .baseline/old.tgz -C /tmp/old
common="--device cuda --sweep '' --runs 10 --warmup 3"
(cd /tmp/old && eval PYTHONPATH=/tmp/site:/tmp/old python3 -m api.cli bench --shape mistral-7b $common --tiers gpu,lmdb \
  --kv-dtype int8,bfloat16 --ratios 0.15 --out /tmp/b-old > "$OUT/bench-old.log" 2>&1)
echo "old done at $(( $(date +%s) - t0 )) s"; grep -v '^|---' /tmp/b-old/bench.md | grep -v '^$' | head -14
# the same new tree with the reads begun after the prefill is queued (as before), for mistral
mkdir -p /tmp/late && cp -r api blend store retrieval eval /tmp/late/ && sed -i '/^        s.start()$/d' /tmp/late/store/tiers.py
(cd /tmp/late && eval PYTHONPATH=/tmp/site:/tmp/late python3 -m api.cli bench --shape mistral-7b $common --tiers gpu,lmdb \
  --kv-dtype int8,bfloat16 --ratios 0.15 --out /tmp/b-late > "$OUT/bench-late.log" 2>&1)
echo "late done at $(( $(date +%s) - t0 )) s"; grep -v '^|---' /tmp/b-late/bench.md | grep -v '^$' | head -14
for shape in mistral-7b llama-3.1-8b qwen2.5-7b; do
  extra=""
  [ "$shape" = mistral-7b ] && extra="--selections value,lookahead,question,question-value --gradual 1,8"
  eval python3 -m api.cli bench --shape "$shape" $common --tiers gpu,cpu,lmdb --kv-dtype int8,bfloat16 --ratios 0.15,0.3 \
    $extra --out /tmp/b-$shape > "$OUT/bench-$shape.log" 2>&1
  echo "$shape done at $(( $(date +%s) - t0 )) s"; grep -v '^|---' /tmp/b-$shape/bench.md | grep -v '^$' || tail -20 "$OUT/bench-$shape.log"
done
(cd /tmp && tar czf "$OUT/bench-md.tgz" b-*/bench.md b-*/bench.json)
