#!/usr/bin/env bash
# On the CPU: the HTTP server over an emulated device step (AsyncEchoBackend), with collect
# waiting only for its own step (the engine since engine/staging.py) or for the step launched
# ahead too (`--collect-waits-all`: the engine before, whose per-step row parking was a
# blocking host-to-device copy), alternating, two rounds, at 2.5 and 3.3 ms a step.
set -eu
out=${1:-bench/results/serve_host/collect_waits_all}
for round in 1 2; do
  for ms in 2.5 3.3; do
    for mode in own all; do
      flag=(); [ $mode = all ] && flag=(--collect-waits-all)
      .venv/bin/python -m ecospa_deploy.bench.serve_host --step-ms $ms "${flag[@]}" \
        --tag _${ms}ms_${mode}_r$round --out "$out" | tail -n 1 | cut -c1-300
    done
  done
done
