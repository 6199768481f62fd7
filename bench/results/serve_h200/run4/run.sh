#!/usr/bin/env bash
# Run 4 (lent GPU): several-row prefill batches pad to powers of two and stay within the
# scheduler's 2 048-token step (fewer graphs to capture at start). The warm-up GPU tests, then
# the HTTP burst and the `ecospa bench serve` loads, both twins (no replay: GPU time).
T0=60 K="prefill_graphs_warmed or decode_graphs_warmed or add_many" T1=0 T3=300 \
  bash bench/results/serve_h200/run3/run.sh
