#!/usr/bin/env bash
# Run 12, call 3 (lent GPU; carry .whl24), on the same card: the peer, transformers serve
# --continuous-batching --cb-use-cuda-graph, same burst and loads (run 8's call 3).
T1=${T1:-420} exec bash bench/results/serve_h200/run8/call3.sh
