#!/usr/bin/env bash
# Run 12, call 1 (lent GPU; carry .whl24): (1) the GPU tests of the engine's graphs,
# uncompiled (decode, padded and packed prefill share Engine._graph_of since the last review);
# (2) serve_twin.sh for the dense twin (the default server's burst and loads, then the burst
# with --prefill-order arrival).
set -u
timeout ${T0:-120} python3 -m pytest -q -p no:cacheprovider tests/test_engine_gpu.py \
  -k "warmed or add_many or (graph_greedy and llama and not True)" \
  >$OUT/gpu_tests.log 2>&1; echo "tests rc $?"; tail -n 3 $OUT/gpu_tests.log
bash bench/results/serve_h200/run12/serve_twin.sh dense
