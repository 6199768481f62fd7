#!/usr/bin/env bash
# Run 6, second call: the two rows whose processes ran out of GPU memory with 14 rows side by
# side (ecospa seed 2 at -50 %, ecospa-act seed 0 at -40 %), after a call that left the first
# GGUF chunk in /tmp/g; the first call's self-generated text comes in as .selftext/. Beside
# them, the engine's warm-up GPU tests of the tree (several-row prefill widths).
timeout 150 python3 -m pytest -q -x -p no:cacheprovider tests/test_engine_gpu.py \
  -k "prefill_graphs_warmed or decode_graphs_warmed or add_many" >$OUT/gpu_tests.log 2>&1 &
PREP="0 2" RQ_ARGS="--gen-batch 512" bash bench/results/real_quality/h200_run3/run.sh 420 \
  "2:ecospa:0.5" "0:ecospa-act:0.4"
wait
tail -n 3 $OUT/gpu_tests.log
