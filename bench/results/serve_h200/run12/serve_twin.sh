#!/usr/bin/env bash
# Run 12, one twin (dense or pruned; lent GPU; carry .whl24), from the checkout's root: the
# default server (packed, compiled prefill, 8 192 tokens a step, shortest first) over HTTP,
# the burst twice and the loads (1024/128 at once, Poisson 16 and 32 req/s); then the same
# burst with --prefill-order arrival, for the order's A/B within the lease.
set -u
which=$1
source bench/results/serve_h200/run3/setup.sh >/dev/null 2>&1
nvidia-smi --query-gpu=name --format=csv,noheader
timeout ${T1:-330} python3 -m ecospa_deploy.bench.serve_gpu --shape llama-1b --which $which \
  --loads --rates 16,32 --tag _${which}_default --out $OUT >$OUT/serve_${which}_default.log 2>&1
echo "$which default rc $?"
timeout ${T2:-120} python3 -m ecospa_deploy.bench.serve_gpu --shape llama-1b --which $which \
  --server-args="--prefill-order arrival" --tag _${which}_arrival --out $OUT \
  >$OUT/serve_${which}_arrival.log 2>&1; echo "$which arrival rc $?"
grep -hE "^$which " $OUT/serve_${which}_*.log | cut -c1-420
