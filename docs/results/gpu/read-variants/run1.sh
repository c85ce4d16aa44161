#!/usr/bin/env bash
# First GPU command of the 2026-12-06 session: where a streamed LMDB read's host time goes
# (read_variants.py), then the baseline bench cells of the default served configuration, profiled.
set -u
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
  && export PYTHONPATH=/tmp/site:$PWD || exit 1
OUT=${OUT:-out/gpu}; mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader; nproc; free -g | head -2
t0=$(date +%s)
python3 docs/results/gpu/read-variants/read_variants.py "$OUT" > "$OUT/read_variants.log" 2>&1; echo "variants rc $? at $(( $(date +%s) - t0 )) s"
cat "$OUT/read_variants.json"
python3 -m api.cli bench --shape mistral-7b --device cuda --sweep '' --tiers gpu,lmdb --kv-dtype int8 --ratios 0.15 \
  --runs 10 --warmup 3 --profile --out /tmp/bench > "$OUT/bench.log" 2>&1; echo "bench rc $? at $(( $(date +%s) - t0 )) s"
grep -v '^|---' /tmp/bench/bench.md 2>/dev/null || tail -30 "$OUT/bench.log"
cp /tmp/bench/bench.md /tmp/bench/bench.json "$OUT"/; (cd /tmp && tar czf "$OUT/profiles.tgz" bench/profile); ls -la "$OUT"
