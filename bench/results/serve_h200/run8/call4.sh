#!/usr/bin/env bash
# Run 8, call 4 (lent GPU; carry .whl24): the short form for a session with ~5 minutes of GPU
# left: both twins' burst, twice each, --no-compile (starts of ~40 s instead of ~170 s), for the
# TTFT split (the aiohttp client's mean vs the scheduler's own arrival-to-first-token).
set -u
source bench/results/serve_h200/run3/setup.sh
timeout ${T1:-250} python3 -m ecospa_deploy.bench.serve_gpu --shape llama-1b \
  --server-args="--no-compile" --tag _nocompile --out $OUT >$OUT/serve_nocompile.log 2>&1
echo "serve rc $?"
tail -n 3 $OUT/serve_nocompile.log | cut -c1-600
