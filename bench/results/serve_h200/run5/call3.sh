#!/usr/bin/env bash
# Run 5, call 3 (lent GPU, same machine): the A/B of the compile on one card. The replay with
# `--no-compile` (run 3's server) and the decode step, compiled and not, at the burst's shapes.
set -u
source bench/results/serve_h200/run3/setup.sh
timeout ${T1:-250} python3 -m ecospa_deploy.bench.serve_replay --shape llama-1b --no-compile \
  --tag _nocompile --out $OUT >$OUT/replay_nocompile.log 2>&1; echo "replay rc $?"
for c in "" default; do
  timeout ${T2:-150} python3 -m ecospa_deploy.bench.profile_decode --shape llama-1b --batch 32 64 \
    --context 128 1152 --decode server --compile "$c" --json $OUT/profile_server${c:+_compiled}.json \
    >$OUT/profile_server${c:+_compiled}.log 2>&1; echo "profile '$c' rc $?"
done
tail -n 3 $OUT/*.log
