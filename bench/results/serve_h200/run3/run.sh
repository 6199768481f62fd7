#!/usr/bin/env bash
# Run 3, call 2 (lent GPU): batched prefill (add_many on graphs warmed for 1/2/4/8 rows, whole
# prompts wait for the next step instead of being cut). The engine's GPU tests first, then the
# burst without HTTP (serve_replay; with T2 also at chunk 4096), then the HTTP burst and the
# `ecospa bench serve` loads (serve_gpu $LOADS, default --loads). A stage whose T is 0 is
# skipped: `T0=0 T1=0 LOADS= bash run.sh` is the HTTP burst alone; $K selects GPU tests (-k).
set -u
source bench/results/serve_h200/run3/setup.sh
[ "${T0:-120}" = 0 ] || { timeout $T0 python3 -m pytest -q -x -p no:cacheprovider --rootdir /tmp \
  $repo/tests/test_engine_gpu.py ${K:+-k "$K"} >$OUT/gpu_tests.log 2>&1; echo "tests rc $?"; }
[ "${T1:-200}" = 0 ] || { timeout $T1 python3 -m ecospa_deploy.bench.serve_replay \
  --shape llama-1b --out $OUT >$OUT/replay.log 2>&1; echo "replay rc $?"; }
[ "${T2:-0}" = 0 ] || { timeout $T2 python3 -m ecospa_deploy.bench.serve_replay --shape llama-1b \
  --prefill-chunk 4096 --tag _chunk4096 --out $OUT >$OUT/replay4096.log 2>&1; echo "rc $?"; }
[ "${T3:-250}" = 0 ] || { timeout $T3 python3 -m ecospa_deploy.bench.serve_gpu --shape llama-1b \
  ${LOADS---loads} --rates ${RATES:-8,16,32} ${WHICH:+--which $WHICH} --out $OUT >$OUT/serve.log 2>&1; echo "serve rc $?"; }
tail -n 3 $OUT/*.log
