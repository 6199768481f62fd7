#!/usr/bin/env bash
# Run 7, call 1 (lent GPU; carry .whl24): the engine core in its own process (--engine-process,
# serve/core.py) against the one-process server, both twins, on one card. The first pair of
# starts compiles (Inductor's cache in /tmp), the second pair reuses it.
set -u
source bench/results/serve_h200/run3/setup.sh
timeout ${T1:-330} python3 -m ecospa_deploy.bench.serve_gpu --shape llama-1b --loads --rates 16,32 \
  --out $OUT >$OUT/serve.log 2>&1; echo "serve rc $?"
timeout ${T2:-240} python3 -m ecospa_deploy.bench.serve_gpu --shape llama-1b --loads --rates 16,32 \
  --server-args="--engine-process" --tag _core --out $OUT >$OUT/serve_core.log 2>&1
echo "serve core rc $?"
tail -n 1 $OUT/*.log | cut -c1-400
