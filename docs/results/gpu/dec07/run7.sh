#!/usr/bin/env bash
# Issue 22's goodput again, after the fix for the spread full prefill that kept its cache alive
# (run2's full rows ran out of memory: 396 MiB asked, requests 174-199): run2.sh itself, then the
# count of failed requests in its log.
set -u
OUT=${OUT:-out/gpu}
bash "$(dirname "$0")/run2.sh"
echo "failed requests: $(grep -c "failed" "$OUT/serve.log")"
