#!/usr/bin/env bash
# Run 15, call 1 (lent GPU; carry .whl24 and .cc24): the GPU tests of the staged copies (a
# copy queued behind a GPU sleep returns before it ends, a pageable one does not; collecting
# a step that parks rows leaves the step launched ahead running, with the same tokens), then
# both twins in one run on warm caches with the loads and the decode profile
# (run14/call2.sh).
set -u
timeout ${T0:-150} python3 -m pytest -q -p no:cacheprovider tests/test_engine_gpu.py \
  -k "staged or parked" >$OUT/gpu_tests.log 2>&1; echo "tests rc $?"; tail -n 3 $OUT/gpu_tests.log
bash bench/results/serve_h200/run14/call2.sh
