#!/usr/bin/env bash
# Run 5, call 1 (lent GPU): the server's decode step compiled (build_backend compile=True, the
# new default of `ecospa serve` on CUDA). The GPU tests of the warm-up and of the compiled
# server backend, then the burst without HTTP (serve_replay), both twins.
T0=170 K="compiles_few or warmed or add_many" T1=330 T3=0 \
  bash bench/results/serve_h200/run3/run.sh
