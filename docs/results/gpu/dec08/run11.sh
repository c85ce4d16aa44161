#!/usr/bin/env bash
# Issue 22, 2026-12-08: blend prefills spread over the scheduler's steps by layers (a piece per
# step, decodes first). bench-serve's fixed-rate rows (200 Poisson requests each, 128 output
# tokens, mistral-7b shape, batched only) at three prefill budgets, so that the time per output
# token shows what the budget buys and what it costs TTFT. run3 (2026-12-07, H100, budget 1024, before the spread) gave TPOT p99 19.0 ms at 9.7 req/s and 28.7 ms at 12.1.
set -u
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
  && export PYTHONPATH=/tmp/site:$PWD || exit 1
OUT=${OUT:-out/gpu}; mkdir -p "$OUT"; t0=$(date +%s)
nvidia-smi --query-gpu=name --format=csv,noheader
serve() {  # name, timeout, then bench-serve flags
  local name=$1 limit=$2; shift 2
  timeout "$limit" python3 -m api.cli bench-serve --shape mistral-7b --device cuda --batched-only --requests 200 \
    --output-tokens 128 --step-batches '' "$@" --out /tmp/serve-$name > "$OUT/serve-$name.log" 2>&1
  echo "$name rc $? at $(( $(date +%s) - t0 )) s"; grep -E "^rate|decode slots" "$OUT/serve-$name.log"
  cp /tmp/serve-$name/serve.json "$OUT/serve-$name.json" 2>/dev/null
}
for budget in 1024 512 256; do
  serve blend-$budget 130 --modes blend --rates 10,14 --prefill-tokens $budget
done
