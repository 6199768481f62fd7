#!/usr/bin/env bash
# Run 5, call 3 (lent GPU, same card): the HTTP burst and `ecospa bench serve` loads on the
# compiled server, dense twin ($WHICH), against call 1's replay of the same tree.
T0=0 T1=0 T3=${T3:-420} RATES=16,32 WHICH=${WHICH:-dense} bash bench/results/serve_h200/run3/run.sh
