#!/usr/bin/env bash
# Run 6, call 1 (lent GPU; carry .whl24): what run 5 could not fit. The server's decode step
# compiled and not at the burst's batches and contexts on one card (the TPOT target compares
# the server's TPOT with this step), then the burst without HTTP, both twins compiled, on the
# card that call 2 serves over HTTP (run 5 measured replay and HTTP on different cards).
set -u
source bench/results/serve_h200/run3/setup.sh
for c in "" default; do
  timeout ${T1:-150} python3 -m ecospa_deploy.bench.profile_decode --shape llama-1b --batch 16 32 64 \
    --context 128 640 1152 --decode server --compile "$c" \
    --json $OUT/profile_server${c:+_compiled}.json >$OUT/profile_server${c:+_compiled}.log 2>&1
  echo "profile '$c' rc $?"
done
timeout ${T2:-300} python3 -m ecospa_deploy.bench.serve_replay --shape llama-1b --out $OUT \
  >$OUT/replay.log 2>&1; echo "replay rc $?"
tail -n 2 $OUT/*.log | cut -c1-300
