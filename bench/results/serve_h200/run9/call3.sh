#!/usr/bin/env bash
# Run 9, call 3 (as run; lent GPU, carry .whl24), after run8/call1.sh on the same card: the
# peer (run8/call3.sh, transformers serve --continuous-batching --cb-use-cuda-graph) and the
# pruned twin's compiled server decode step (call 1's profile reached its limit after dense).
T1=330 bash bench/results/serve_h200/run8/call3.sh
source bench/results/serve_h200/run3/setup.sh >/dev/null 2>&1
timeout 220 python3 -m ecospa_deploy.bench.profile_decode --shape llama-1b --which pruned \
  --batch 16 32 64 --context 128 640 1152 --decode server --compile default \
  --json $OUT/profile_server_compiled_pruned.json >$OUT/profile_pruned.log 2>&1
echo "profile rc $?"
