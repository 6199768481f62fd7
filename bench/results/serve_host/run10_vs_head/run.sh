#!/usr/bin/env bash
# Run 10's tree against this checkout over the instant backend, three alternating rounds:
#   git worktree add RUN10_TREE ffc5c92
#   bash bench/results/serve_host/run10_vs_head/run.sh RUN10_TREE OUT_DIR
# (run from this checkout's root; each tree runs its own bench/serve_host.py).
set -u
run10=$(realpath "${1:?the run 10 worktree}") out=$(realpath -m "${2:?output folder}") head=$PWD
mkdir -p "$out"
for r in 1 2 3; do
  (cd "$run10" && PYTHONPATH="$run10" timeout 600 python bench/serve_host.py --repeats 5 \
    --tag _run10_r$r --out "$out") >"$out/run10_r$r.log" 2>&1
  (cd "$head" && PYTHONPATH="$head" timeout 600 python bench/serve_host.py --repeats 5 \
    --tag _head_r$r --out "$out") >"$out/head_r$r.log" 2>&1
done
