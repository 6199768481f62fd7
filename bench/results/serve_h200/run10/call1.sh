#!/usr/bin/env bash
# Run 10, call 1 (lent GPU; carry .whl24): where the packed prefill's time goes (run 9: ~2.3x
# its matmul floor). (1) GPU tests of packed prefill, compiled included. (2) profile_prefill,
# both twins, 2048 and 8192 tokens of 256-token prompts: call vs graph time, floor, kernel
# split; then the same with the packed prefill compiled (Engine(compile_prefill=True)).
set -u
python3 -m pytest -q -p no:cacheprovider tests/test_engine_gpu.py -k "varlen or packed" \
  >$OUT/gpu_tests.log 2>&1; echo "tests rc $?"; tail -n 3 $OUT/gpu_tests.log
source bench/results/serve_h200/run3/setup.sh >/dev/null 2>&1
timeout ${T1:-150} python3 -m ecospa_deploy.bench.profile_prefill --shape llama-1b \
  --tokens 2048 8192 --json $OUT/profile_prefill.json >$OUT/profile_prefill.log 2>&1
echo "profile rc $?"
timeout ${T2:-300} python3 -m ecospa_deploy.bench.profile_prefill --shape llama-1b \
  --tokens 2048 8192 --compile-prefill --json $OUT/profile_prefill_compiled.json \
  >$OUT/profile_prefill_compiled.log 2>&1
echo "profile compiled rc $?"
grep -h '^{' $OUT/profile_prefill*.log | cut -c1-400
