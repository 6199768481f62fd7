#!/usr/bin/env bash
# Run 9, call 2 (lent GPU; carry .whl24): packed prefill with the padding as a sequence of its
# own and the attention's length bound at the prompts' (packing.packed_max_len) instead of
# the bucket, whose empty blocks call 1's graphs paid for. GPU tests, then the burst without
# HTTP, both twins, --no-compile, at --prefill-chunk 2048 and 8192.
set -u
python3 -m pytest -q -p no:cacheprovider tests/test_engine_gpu.py -k "varlen or packed" \
  >$OUT/gpu_tests.log 2>&1; echo "tests rc $?"; tail -n 3 $OUT/gpu_tests.log
source bench/results/serve_h200/run3/setup.sh >/dev/null 2>&1
for chunk in 2048 8192; do
  timeout ${T1:-150} python3 -m ecospa_deploy.bench.serve_replay --shape llama-1b --no-compile \
    --prefill-chunk $chunk --tag _packed2_nocompile_chunk$chunk --out $OUT \
    >$OUT/replay_chunk$chunk.log 2>&1; echo "replay $chunk rc $?"
done
tail -n 3 $OUT/replay_*.log | cut -c1-900
