# Sourced by run scripts on the lent GPU, after run3/setup.sh (from /tmp; $repo is the checkout):
# Inductor's and Triton's caches in /tmp/cc, restored from the carried .cc24/ when a former
# lease left one (`cat compile_cache.tgz.* | tar xz`), and `cache_save` packs them into $OUT
# in parts of at most 15 MiB (what a call can bring back), to be carried next time:
#   mkdir -p .cc24 && cp /work/.device/N/compile_cache.tgz.* .cc24/   (then carry .cc24)
# A cold start compiles for minutes (run 13: the pruned twin past 313 s at 142 of 172
# graphs, the dense one 194 s); a warm cache starts either twin in under a minute. Both cards
# lent here are sm_90 with the same torch and Triton, so the kernels hold on either.
mkdir -p /tmp/cc/inductor /tmp/cc/triton
export TORCHINDUCTOR_CACHE_DIR=/tmp/cc/inductor TRITON_CACHE_DIR=/tmp/cc/triton
if ls "$repo"/.cc24/compile_cache.tgz.* >/dev/null 2>&1; then
  cat "$repo"/.cc24/compile_cache.tgz.* | tar xz -C /tmp/cc && echo "compile cache restored"
fi

# A call brings back at most 8 files: the results go into one tarball first.
results_bundle() {
  (cd "$OUT" && tar czf results.tgz --remove-files $(ls | grep -vE '^(compile_cache|results)'))
}

cache_save() {
  tar czf - -C /tmp/cc . | split -b 15m -d - "$OUT/compile_cache.tgz."
  du -ch "$OUT"/compile_cache.tgz.* | tail -n 1   # carried with .whl24 under 64 MiB a call
}

# The lease's host, read before and after a call's servers: the CPU, its load, one core's
# speed at per-token Python work, and the HTTP side's own tokens/s over a backend that costs
# nothing (run 14's lease served both twins slower than run 10's with the same kernels).
host_probe() {
  timeout 120 python3 -m ecospa_deploy.bench.serve_host --repeats 3 --tag "_host$1" \
    --out "$OUT" >"$OUT/host$1.log" 2>&1
  tail -n 1 "$OUT/host$1.log" | cut -c1-400
}
