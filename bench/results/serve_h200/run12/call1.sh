#!/usr/bin/env bash
# Run 12, call 1 (lent GPU; carry .whl24): (1) the GPU tests of the engine's graphs, uncompiled (decode,
# padded and packed prefill share Engine._graph_of since the last review); (2) the default
# server (packed, compiled prefill, 8 192 tokens a step, shortest first) over HTTP, dense twin:
# the burst twice and the loads (1024/128 at once, Poisson 16 and 32 req/s); (3) the same burst
# with --prefill-order arrival, for the order's A/B within this lease.
set -u
timeout ${T0:-120} python3 -m pytest -q -p no:cacheprovider tests/test_engine_gpu.py \
  -k "warmed or add_many or (graph_greedy and llama and not True)" \
  >$OUT/gpu_tests.log 2>&1; echo "tests rc $?"; tail -n 3 $OUT/gpu_tests.log
source bench/results/serve_h200/run3/setup.sh >/dev/null 2>&1
nvidia-smi --query-gpu=name --format=csv,noheader
timeout ${T1:-330} python3 -m ecospa_deploy.bench.serve_gpu --shape llama-1b --which dense \
  --loads --rates 16,32 --tag _dense_default --out $OUT >$OUT/serve_dense_default.log 2>&1
echo "dense default rc $?"
timeout ${T2:-120} python3 -m ecospa_deploy.bench.serve_gpu --shape llama-1b --which dense \
  --server-args="--prefill-order arrival" --tag _dense_arrival --out $OUT \
  >$OUT/serve_dense_arrival.log 2>&1; echo "dense arrival rc $?"
grep -hE '^dense ' $OUT/serve_dense_*.log | cut -c1-420
