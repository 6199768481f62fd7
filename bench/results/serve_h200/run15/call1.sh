#!/usr/bin/env bash
# Run 15, call 1 (lent GPU; carry .whl24): the GPU tests of the staged copies (a copy queued
# behind a GPU sleep returns before it ends, a pageable one does not; collecting a step that
# parks rows leaves the step launched ahead running, with the same tokens), then the lease's
# host.
set -u
timeout ${T0:-240} python3 -m pytest -q -p no:cacheprovider tests/test_engine_gpu.py \
  -k "staged or parked" >$OUT/gpu_tests.log 2>&1; echo "tests rc $?"; tail -n 3 $OUT/gpu_tests.log
source bench/results/serve_h200/run3/setup.sh >/dev/null 2>&1
source $repo/bench/results/serve_h200/compile_cache.sh
host_probe _lease
results_bundle
