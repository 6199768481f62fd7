#!/usr/bin/env bash
# Run 12, call 0 (lent GPU; carry .whl24): what the session's lent time still allowed after
# nine failed starts, one call: the uncompiled GPU tests of the engine's graphs (call 1's (1)),
# then the default server over HTTP, both twins, the burst twice and the loads (run 10's call 2).
set -u
timeout ${T0:-100} python3 -m pytest -q -p no:cacheprovider tests/test_engine_gpu.py \
  -k "warmed or add_many or (graph_greedy and llama and not True)" \
  >$OUT/gpu_tests.log 2>&1; echo "tests rc $?"; tail -n 3 $OUT/gpu_tests.log
T1=${T1:-440} bash bench/results/serve_h200/run10/call2.sh
