#!/usr/bin/env bash
# Run 4 in what was left of a session's GPU time: the HTTP burst and the loads at two Poisson
# rates, both twins; no GPU tests (the server's start exercises the warm-up).
T0=0 T1=0 T3=${T3:-240} RATES=16,32 bash bench/results/serve_h200/run3/run.sh
