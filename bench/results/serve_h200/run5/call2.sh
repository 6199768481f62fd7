#!/usr/bin/env bash
# Run 5, call 2 (lent GPU, right after call 1 on the same card): the compile's A/B without
# HTTP. The dense twin's burst with `--no-compile` (run 3's server), then the pruned twin's
# compiled (call 1's 330 s limit ended inside its start), with warm-up's two compiles.
set -u
source bench/results/serve_h200/run3/setup.sh
timeout ${T1:-130} python3 -m ecospa_deploy.bench.serve_replay --shape llama-1b --no-compile \
  --which dense --tag _dense_nocompile --out $OUT >$OUT/replay_dense_nocompile.log 2>&1
echo "replay no-compile rc $?"
timeout ${T2:-390} python3 -m ecospa_deploy.bench.serve_replay --shape llama-1b --which pruned \
  --tag _pruned --out $OUT >$OUT/replay_pruned.log 2>&1; echo "replay pruned rc $?"
tail -n 2 $OUT/*.log
