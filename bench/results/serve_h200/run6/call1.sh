#!/usr/bin/env bash
# Run 6, call 1 (lent GPU; carry .whl24): async decode (step N+1 launched before step N's
# tokens are handled) without HTTP, on the card the next calls serve over HTTP. The GPU tests
# of launch/collect and the compiled warm-up, then the burst replayed for both twins (async,
# the default), then the dense twin with --no-async-decode (the A/B; Inductor's cache is warm).
set -u
source bench/results/serve_h200/run3/setup.sh
timeout ${T0:-150} python3 -m pytest -q -x -p no:cacheprovider --rootdir /tmp \
  $repo/tests/test_engine_gpu.py $repo/tests/test_engine.py -k "launched or compiles_few or warmed" \
  >$OUT/gpu_tests.log 2>&1; echo "tests rc $?"
timeout ${T1:-330} python3 -m ecospa_deploy.bench.serve_replay --shape llama-1b --out $OUT \
  >$OUT/replay.log 2>&1; echo "replay rc $?"
timeout ${T2:-90} python3 -m ecospa_deploy.bench.serve_replay --shape llama-1b --which dense \
  --no-async-decode --tag _dense_sync --out $OUT >$OUT/replay_dense_sync.log 2>&1
echo "replay sync rc $?"
tail -n 2 $OUT/*.log | cut -c1-400
