#!/usr/bin/env bash
# Run 5, call 4 (lent GPU): the GIL switch interval's A/B on the compiled server, one card. The
# pruned twin with `--gil-switch-ms 0.5` (the new default), then with Python's 5 ms (what calls
# 1-3 ran), then the dense twin at 0.5 ms, each through the HTTP burst and the loads.
set -u
source bench/results/serve_h200/run3/setup.sh
for spec in "pruned:0.5" "pruned:5" "dense:0.5"; do
  which=${spec%%:*} ms=${spec##*:}
  timeout ${T:-230} python3 -m ecospa_deploy.bench.serve_gpu --shape llama-1b --loads \
    --rates 16,32 --which $which --server-args "--gil-switch-ms $ms" --tag _${which}_gil$ms \
    --out $OUT >$OUT/serve_${which}_gil$ms.log 2>&1; echo "$spec rc $?"
done
tail -n 1 $OUT/*.log | cut -c1-400
