#!/usr/bin/env bash
# Run 6, call 2 (same card, right after call 1): the HTTP burst and loads, both twins, on the
# default server (compiled, async decode, GIL 0.5 ms), then the pruned twin with
# --no-async-decode (the A/B over HTTP).
set -u
source bench/results/serve_h200/run3/setup.sh
timeout ${T:-330} python3 -m ecospa_deploy.bench.serve_gpu --shape llama-1b --loads --rates 16,32 \
  --out $OUT >$OUT/serve.log 2>&1; echo "serve rc $?"
timeout ${T2:-150} python3 -m ecospa_deploy.bench.serve_gpu --shape llama-1b --loads --rates 16,32 \
  --which pruned --server-args="--no-async-decode" --tag _pruned_sync --out $OUT \
  >$OUT/serve_pruned_sync.log 2>&1; echo "serve sync rc $?"
tail -n 1 $OUT/*.log | cut -c1-400
