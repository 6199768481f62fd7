#!/usr/bin/env bash
# Run 2 of the real-model table on the lent H200 (one device call per invocation, resumable):
# seeds 1 and 2 of the methods that matter, then seed 0 of those changed since run 1, then the
# rest. The GGUF arrives in two carried chunks (.gg/part.aa copied to /tmp/g by the call before,
# .gg/part.ab in this one); .whl holds the gguf wheel, .gtexts the evaluation texts written by
# ecospa_deploy.domains.write_domains on the CPU machine. $1: seconds for the shards; then job
# groups "SEEDS:METHODS" run in order by every shard; $PREP: the seeds whose text is generated.
set -u
budget=${1:-500}; shift
main="flap ecospa-act wanda-sp llm-pruner numerical"
groups=("$@")
[ ${#groups[@]} -gt 0 ] || groups=("1 2:$main" "0:ecospa-act numerical llm-pruner" \
                                  "1 2:ecospa magnitude numerical-dims")
export ECOSPA_SMOLLM2_GGUF=/tmp/g/s.gguf ECOSPA_CACHE=/tmp/ec HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
if [ ! -d /tmp/site/ecospa_deploy ]; then
  cat /tmp/g/part.aa .gg/part.ab > /tmp/g/s.gguf && sha256sum /tmp/g/s.gguf
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl
  cp -r ecospa_deploy /tmp/site/ && cp -r bench /tmp/site/ecospa_deploy/bench \
    && cp -r converters /tmp/site/ecospa_deploy/converters
fi
export PYTHONPATH=/tmp/site
repo=$PWD; cd /tmp   # not the checkout: its ecospa_deploy/ would shadow the installed copy
nvidia-smi --query-gpu=name,memory.used --format=csv,noheader
python3 -c "import torch, transformers; print(torch.__version__, transformers.__version__)"
t0=$(date +%s)
python3 -c "from ecospa_deploy.smollm2 import dense_dir; print(dense_dir())" || exit 1
rq="python3 -m ecospa_deploy.bench.real_quality --out /tmp/rq --texts $repo/.gtexts --device cuda"
for s in ${PREP:-0 1 2}; do $rq --prepare --seeds $s >/tmp/prep$s.log 2>&1 & done; wait
echo "prepared in $(( $(date +%s) - t0 )) s"
n=${SHARDS:-6}
left=$(( budget - ($(date +%s) - t0) ))
for k in $(seq 0 $((n - 1))); do
  cmds=""
  for g in "${groups[@]}"; do cmds+="$rq --shard $k/$n --seeds ${g%%:*} --methods ${g#*:}; "; done
  timeout $left bash -c "$cmds" >>/tmp/shard$k.log 2>&1 &
done
wait
echo "rows: $(cat /tmp/rq/rows-*.json | grep -c '"method"') after $(( $(date +%s) - t0 )) s"
tail -n 3 /tmp/shard*.log /tmp/prep*.log
cd /tmp && tar czf $OUT/rq.tgz rq shard*.log prep*.log
