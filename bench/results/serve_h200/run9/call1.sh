#!/usr/bin/env bash
# Run 9, call 1 (lent GPU; carry .whl24): packed prefill. (1) Its GPU tests (flash varlen
# against one SDPA per prompt; packed graphs warmed give the eager packed tokens). (2) The
# burst without HTTP (serve_replay), both twins, packed (the new default) and padded rows
# (--no-packed-prefill), --no-compile on both (compile touches only the decode step; starts of
# ~40 s instead of ~150 s): the prefill seconds of the burst's 19 add_many calls, its TTFT.
set -u
python3 -m pytest -q -p no:cacheprovider tests/test_engine_gpu.py -k "varlen or packed or add_many" \
  >$OUT/gpu_tests.log 2>&1; echo "tests rc $?"; tail -n 3 $OUT/gpu_tests.log
source bench/results/serve_h200/run3/setup.sh
timeout ${T1:-170} python3 -m ecospa_deploy.bench.serve_replay --shape llama-1b --no-compile \
  --tag _packed_nocompile --out $OUT >$OUT/replay_packed.log 2>&1; echo "replay packed rc $?"
timeout ${T2:-170} python3 -m ecospa_deploy.bench.serve_replay --shape llama-1b --no-compile \
  --no-packed-prefill --tag _rows_nocompile --out $OUT >$OUT/replay_rows.log 2>&1
echo "replay rows rc $?"
tail -n 3 $OUT/replay_*.log | cut -c1-700
