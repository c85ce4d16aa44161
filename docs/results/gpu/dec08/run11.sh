#!/usr/bin/env bash
# Issue 22, 2026-12-08, one command (replaces dec07/run7.sh): the goodput search of run2.sh (blend and
# full, 32 and 128 output tokens, the decode step table) with 2026-12-08's blend prefills spread
# over the scheduler's steps by layers and the fix for the spread full prefill's cache; then blend's
# fixed-rate rows (200 Poisson requests each, 128 output tokens, batched only) at two smaller prefill
# budgets, so that the time per output token shows what the budget buys and what it costs TTFT.
# run3 (2026-12-07, H100, budget 1024, before the spread) gave blend TPOT p99 19.0 ms at 9.7 req/s
# and 28.7 ms at 12.1. About 9.5 minutes.
set -u
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
  && export PYTHONPATH=/tmp/site:$PWD || exit 1
OUT=${OUT:-out/gpu}; mkdir -p "$OUT"; t0=$(date +%s)
nvidia-smi --query-gpu=name --format=csv,noheader
timeout 360 python3 -m api.cli bench-serve --shape mistral-7b --device cuda --rates '' --goodput 32,128 --modes blend,full \
  --goodput-requests 200 --goodput-runs 3 --step-batches 1,32 --step-contexts 4096 --time-budget 330 --out /tmp/serve \
  > "$OUT/serve.log" 2>&1
echo "goodput rc $? at $(( $(date +%s) - t0 )) s"; cp /tmp/serve/serve.* "$OUT/" 2>/dev/null; cat /tmp/serve/serve.md
echo "failed requests: $(grep -c "failed" "$OUT/serve.log")"
serve() {  # name, timeout, then bench-serve flags
  local name=$1 limit=$2; shift 2
  timeout "$limit" python3 -m api.cli bench-serve --shape mistral-7b --device cuda --batched-only --requests 200 \
    --output-tokens 128 --step-batches '' "$@" --out /tmp/serve-$name > "$OUT/serve-$name.log" 2>&1
  echo "$name rc $? at $(( $(date +%s) - t0 )) s"; grep -E "^rate|decode slots" "$OUT/serve-$name.log"
  cp /tmp/serve-$name/serve.json "$OUT/serve-$name.json" 2>/dev/null
}
for budget in 512 256; do
  serve blend-$budget 110 --modes blend --rates 10,14 --prefill-tokens $budget
done
