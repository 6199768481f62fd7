#!/usr/bin/env bash
# Run 15, call 5 (lent GPU; carry .whl24 and .cc24), after call 4 (run14/call2.sh) on the same
# lease: where the served burst loses to the plan's clock (run 14: 77 % dense, 65 % pruned).
# The burst without HTTP (`serve_replay`: the scheduler and the engine alone, the server's
# defaults), then over HTTP with the engine core in its own process (`--engine-process`: the
# model, the scheduler and the decode loop in a process whose GIL the HTTP side never takes);
# call 4's in-process HTTP burst is the third arm. On the CPU over an emulated 2.5-3.3 ms step,
# the HTTP side keeps up to within ~0.3 ms a step (`bench/results/serve_host/RUNS.md`).
set -u
source bench/results/serve_h200/run3/setup.sh >/dev/null 2>&1
source $repo/bench/results/serve_h200/compile_cache.sh
nvidia-smi --query-gpu=name --format=csv,noheader
host_probe _start
timeout ${T0:-200} python3 -m ecospa_deploy.bench.serve_replay --shape llama-1b \
  --out $OUT >$OUT/replay.log 2>&1
echo "replay rc $?"
tail -n 4 $OUT/replay.log | cut -c1-420
timeout ${T1:-240} python3 -m ecospa_deploy.bench.serve_gpu --shape llama-1b \
  --server-args=--engine-process --tag _core --out $OUT >$OUT/serve_core.log 2>&1
echo "core rc $?"
grep -h "server up" $OUT/serve_core.log
grep -hE "^(dense|pruned) |pruned_over" $OUT/serve_core.log | cut -c1-420
grep -hE "objects frozen|gc while serving" $OUT/server_*.log | cut -c1-300
host_probe _end
results_bundle
