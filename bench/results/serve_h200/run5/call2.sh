#!/usr/bin/env bash
# Run 5, call 2 (lent GPU, right after call 1): the HTTP burst and the `ecospa bench serve`
# loads on the compiled server, both twins (serve_gpu --loads --rates 16,32).
T0=0 T1=0 T3=560 RATES=16,32 bash bench/results/serve_h200/run3/run.sh
