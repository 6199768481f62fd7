#!/usr/bin/env bash
# Run 13, call 3 (lent GPU; carry .whl24): the warm-up's progress callback on the GPU (the
# decode and prefill warm-up tests), then the pruned twin alone on the default server with
# the loads, its server log streamed to $OUT (call 2's pruned run printed nothing in 280 s:
# the log says where a cold start spends its time).
set -u
timeout ${T0:-60} python3 -m pytest -q -p no:cacheprovider tests/test_engine_gpu.py -k warmed \
  >$OUT/gpu_tests.log 2>&1; echo "tests rc $?"; tail -n 2 $OUT/gpu_tests.log
source bench/results/serve_h200/run3/setup.sh >/dev/null 2>&1
timeout ${T1:-470} python3 -m ecospa_deploy.bench.serve_gpu --shape llama-1b --which pruned \
  --loads --rates 16,32 --tag _pruned_default --out $OUT >$OUT/serve_pruned_default.log 2>&1
echo "pruned default rc $?"
grep -E "warm-up|server up" $OUT/*.log | cut -c1-200 | tail -n 12
grep -hE "^pruned " $OUT/serve_pruned_default.log | cut -c1-420
