#!/usr/bin/env bash
# Run 3 of the real-model table (H200): longer recovery (issue target: recovered within 10 minutes).
# As ../h100_run2/run.sh (GGUF in two carried chunks, .gg/part.aa copied to /tmp/g by the call
# before; .whl the gguf wheel; .gtexts the evaluation texts), plus: $RQ_ARGS passed to every
# real_quality call, and the self-generated text cached in /tmp/ec/selftext travels back as
# $OUT/selftext.tgz and in again from .selftext/ (so a later call does not generate it again).
# $1: seconds for the rows; then job groups "SEEDS:METHODS:FRACTIONS", one shard per group;
# $PAR (default: all) caps how many groups run at once, the rest start as earlier ones end.
set -u
budget=${1:-500}; shift
export ECOSPA_SMOLLM2_GGUF=/tmp/g/s.gguf ECOSPA_CACHE=/tmp/ec HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
if [ ! -d /tmp/site/ecospa_deploy ]; then
  cat /tmp/g/part.aa .gg/part.ab > /tmp/g/s.gguf && sha256sum /tmp/g/s.gguf
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl
  cp -r ecospa_deploy /tmp/site/ && cp -r bench /tmp/site/ecospa_deploy/bench \
    && cp -r converters /tmp/site/ecospa_deploy/converters
fi
mkdir -p /tmp/ec/selftext && { [ -d .selftext ] && cp .selftext/*.pt /tmp/ec/selftext/ || true; }
export PYTHONPATH=/tmp/site
repo=$PWD; cd /tmp   # not the checkout: its ecospa_deploy/ would shadow the installed copy
nvidia-smi --query-gpu=name,memory.used --format=csv,noheader
t0=$(date +%s)
python3 -c "from ecospa_deploy.smollm2 import dense_dir; print(dense_dir())" || exit 1
rq="python3 -m ecospa_deploy.bench.real_quality --out /tmp/rq --texts $repo/.gtexts --device cuda ${RQ_ARGS:-}"
for s in ${PREP:-}; do $rq --prepare --seeds $s >/tmp/prep$s.log 2>&1 & done; wait
echo "prepared in $(( $(date +%s) - t0 )) s"
k=0
for g in "$@"; do
  while [ "$(jobs -rp | wc -l)" -ge "${PAR:-$#}" ]; do wait -n; done
  left=$(( budget - ($(date +%s) - t0) )); [ $left -gt 30 ] || break
  IFS=: read -r seeds methods fractions <<<"$g"
  timeout $left $rq --shard 0/1 --seeds $seeds --methods $methods --fractions $fractions \
    --out /tmp/rq/g$k >>/tmp/shard$k.log 2>&1 &
  k=$((k + 1))
done
wait
for f in /tmp/shard*.log; do echo "$f: $(tr '\r' '\n' <$f | grep -v '^ *$' | tail -n 1 | cut -c1-200)"; done
echo "rows: $(cat /tmp/rq/g*/rows-*.json 2>/dev/null | grep -c '"method"') after $(( $(date +%s) - t0 )) s"
cd /tmp && tar czf $OUT/rq.tgz rq shard*.log $(ls prep*.log 2>/dev/null)
tar czf $OUT/selftext.tgz -C /tmp/ec selftext
